-- Herald publish script: append to a channel's history and publish the
-- envelope carrying the new id, atomically.
--
-- KEYS[1]  history stream   <prefix>:{<channel>}:h
-- KEYS[2]  pub/sub channel  <prefix>:{<channel>}
-- ARGV[1]  event name, or "" for the default `message`
-- ARGV[2]  data as JSON text (a JSON string is delivered as its text)
-- ARGV[3]  history size (entries kept, approximately: MAXLEN ~)
-- ARGV[4]  history TTL in seconds (idle history expires)
-- ARGV[5]  optional: the pub/sub command, PUBLISH (default) or SPUBLISH
--          (Redis Cluster, sharded pub/sub)
-- Returns the new entry id, "<ms>-<seq>".
local event, data = ARGV[1], ARGV[2]
local command = ARGV[5] or 'PUBLISH'
if command ~= 'PUBLISH' and command ~= 'SPUBLISH' then
  return redis.error_reply('ERR herald: ARGV[5] must be PUBLISH or SPUBLISH')
end
if not pcall(cjson.decode, data) then
  return redis.error_reply('ERR herald: data must be JSON text')
end
if event ~= '' and (#event > 64 or string.find(event, '[^%w_.:-]')) then
  return redis.error_reply('ERR herald: event names are 1-64 characters of A-Z a-z 0-9 _ . : -')
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', event, 'd', data)
redis.call('EXPIRE', KEYS[1], ARGV[4])
local ms = string.match(id, '^(%d+)-')
local named = ''
if event ~= '' then
  named = ',"event":"' .. event .. '"'
end
redis.call(command, KEYS[2],
  '{"id":"' .. id .. '"' .. named .. ',"data":' .. data .. ',"ts":' .. ms .. '}')
return id

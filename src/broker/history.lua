-- Herald history read: entries after a position, and what Redis knows about
-- trimmed entries, read atomically so a trim cannot slip in between.
--
-- KEYS[1]  history stream
-- ARGV[1]  read entries with ids greater than this
-- ARGV[2]  at most this many entries
-- Returns {0} when the stream does not exist, else
-- {1, max-deleted-entry-id, last-generated-id, entries}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local deleted, last = '0-0', '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {1, deleted, last, entries}

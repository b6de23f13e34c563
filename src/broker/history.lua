-- Herald history read: entries after a position, and what Redis knows about
-- trimmed entries, read atomically so a trim cannot slip in between.
--
-- KEYS[1]  history stream
-- ARGV[1]  read entries with ids greater than this
-- ARGV[2]  at most this many entries
-- Returns {0} when the stream does not exist, else
-- {1, max-deleted-entry-id, last-generated-id, first-entry-id, trimmed, entries}
-- where trimmed is 1 when entries were ever removed (entries-added > length).
-- MAXLEN trimming does not move max-deleted-entry-id (Redis 7.0), so the
-- caller also treats a position older than the first kept entry of a
-- trimmed stream as a gap.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local deleted, last, first = '0-0', '0-0', '0-0'
local added, length = 0, 0
for i = 1, #info, 2 do
  local k, v = info[i], info[i + 1]
  if k == 'max-deleted-entry-id' then deleted = v end
  if k == 'last-generated-id' then last = v end
  if k == 'entries-added' then added = v end
  if k == 'length' then length = v end
  if k == 'first-entry' and type(v) == 'table' then first = v[1] end
end
local trimmed = 0
if added > length then trimmed = 1 end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {1, deleted, last, first, trimmed, entries}

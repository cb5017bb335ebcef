-- KEYS: the room's presence entries (a sorted set of "author|node", scored by expiry
-- in ms of Redis's clock, so nodes' clocks do not matter) and its online authors (a
-- hash: author -> how many nodes have an entry). Both carry the room's {hash tag}.
-- ARGV: the shard channel, this node, the entries' ttl in ms, the event time, the
-- room id, how many authors to remove, then those authors, then the authors to add
-- (or refresh). Expired entries (a node that died) are purged first. Every change
-- that makes an author appear or vanish is published on the room's channel, after
-- the messages before it and before those after it. Returns the online authors.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function announce(kind, author)
    redis.call('SPUBLISH', ARGV[1], '{"message_type":"' .. kind .. '","author_id":' ..
        author .. ',"room_id":' .. ARGV[5] .. ',"content":"","create_at":"' .. ARGV[4] ..
        '","online":' .. redis.call('HLEN', KEYS[2]) .. '}')
end
local function withdraw(author)
    if redis.call('HINCRBY', KEYS[2], author, -1) <= 0 then
        redis.call('HDEL', KEYS[2], author)
        announce('chat_exit', author)
    end
end
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
    redis.call('ZREM', KEYS[1], entry)
    withdraw(string.match(entry, '^[^|]+'))
end
local removals = tonumber(ARGV[6])
for i = 7, 6 + removals do
    if redis.call('ZREM', KEYS[1], ARGV[i] .. '|' .. ARGV[2]) == 1 then
        withdraw(ARGV[i])
    end
end
local ttl = tonumber(ARGV[3])
for i = 7 + removals, #ARGV do
    if redis.call('ZADD', KEYS[1], now + ttl, ARGV[i] .. '|' .. ARGV[2]) == 1 and
            redis.call('HINCRBY', KEYS[2], ARGV[i], 1) == 1 then
        announce('chat_enter', ARGV[i])
    end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('PEXPIRE', KEYS[1], 2 * ttl)
    redis.call('PEXPIRE', KEYS[2], 2 * ttl)
else
    redis.call('DEL', KEYS[2])
end
return redis.call('HKEYS', KEYS[2])

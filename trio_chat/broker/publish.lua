-- KEYS: the room's counter, the room's recent list, the room's log (messages not
-- yet in the history store) and, for a message with a client_msg_id, the key
-- remembering it (one hash slot: all carry the room's {hash tag}, and so does the
-- shard channel, as a Redis Cluster requires of SPUBLISH in a script; a cluster
-- client runs it on that slot's node by KEYS).
-- ARGV: the shard channel, the floor for the counter (the publisher's last id,
-- which restores the counter if Redis lost it), the message JSON after its id, the
-- recent list's length, the keys' idle expiry in seconds, the idempotency window in
-- seconds, for an edit or delete the id of the message it changes and that
-- message's JSON after the change (else two empty strings), and "1" to log the
-- message (else ""), and the recent list's idle expiry in seconds (shorter than the
-- counter's: the list holds whole messages, for any room id anyone published to).
-- Returns {1, id, log entry id or ""} for a new message, {0, JSON of the message
-- sent before} for a client_msg_id seen within the window (nothing is published then).
if KEYS[4] then
    local sent = redis.call('GET', KEYS[4])
    if sent then
        return {0, sent}
    end
end
local floor = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[1]) or '0') < floor then
    redis.call('SET', KEYS[1], floor)
end
local id = redis.call('INCR', KEYS[1])
local payload = '{"id":' .. id .. ',' .. ARGV[3]
if ARGV[7] ~= '' then
    local prefix = '{"id":' .. ARGV[7] .. ','
    for i, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        if string.sub(item, 1, #prefix) == prefix then
            if not string.find(item, '"deleted_at":', 1, true) then
                redis.call('LSET', KEYS[2], i - 1, ARGV[8])
            end
            break
        end
    end
end
redis.call('RPUSH', KEYS[2], payload)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[10])
local entry = ''
if ARGV[9] == '1' then
    entry = redis.call('XADD', KEYS[3], '*', 'm', payload)
end
if KEYS[4] then
    redis.call('SET', KEYS[4], payload, 'EX', ARGV[6])
end
redis.call('SPUBLISH', ARGV[1], payload)
return {1, id, entry}

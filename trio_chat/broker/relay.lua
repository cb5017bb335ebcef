-- KEYS: the room's counter (only so that a cluster client runs this on the room's
-- shard). ARGV: the shard channel, an operator's command or an event (typing).
return redis.call('SPUBLISH', ARGV[1], ARGV[2])

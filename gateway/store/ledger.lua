-- One usage-ledger row, counted once however often it is written: the write's marker (its write id, in the row's
-- hash slot) is set with a TTL when the row is counted, and a write that finds it counts nothing.
-- KEYS: the ledger hash, the write's marker. ARGV: the marker's TTL and the hash's TTL in seconds, then pairs of
-- field and increment. Reply: 1 when counted, 0 when the write had landed before.
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1

"""The Lua scripts of the Redis job store: each state change of a job, atomic on the server.

Each script takes the key namespace as ARGV[1] and the job id as ARGV[2] (key names are built inside, so
this needs one Redis, not a cluster); times come from the server's clock (TIME). They mirror the SQL of
sqlite_store.py statement for statement: conditional on the status and the lease token, one event per
change, event ids from one counter.
"""

# Shared by every script: ARGV[1] is the namespace; times come from the server.
_PRELUDE = """
local ns = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function load(k)
  local flat = redis.call('HGETALL', k)
  if #flat == 0 then return nil end
  local job = {}
  for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
  return job
end
local function event(id, at, kind, status, stage, progress, message)
  -- numbered within the job (1, 2, ...): events are only ever added, and removed with the job
  local eid = redis.call('ZCARD', ns .. ':events:' .. id) + 1
  redis.call('ZADD', ns .. ':events:' .. id, eid, cjson.encode({id = eid, job_id = id, at = at, type = kind,
    status = status, stage = stage or cjson.null, progress = tonumber(progress), message = message}))
end
local function move(id, seq, from, to)
  redis.call('ZREM', ns .. ':status:' .. from, id)
  redis.call('ZADD', ns .. ':status:' .. to, seq, id)
end
local function end_job(k, id, job, status, code, text, artifacts, result)
  local t = now()
  local stage, progress, message = job.stage, job.progress, 'merged'
  if status == 'succeeded' then stage, progress = 'done', '1' end
  if code ~= '' then message = text end
  redis.call('HSET', k, 'status', status, 'stage', stage, 'progress', progress, 'message', message,
    'finished_at', fmt(t), 'artifacts', artifacts, 'result', result or '{}')
  if code ~= '' then redis.call('HSET', k, 'error_code', code, 'error_message', text) end
  redis.call('HDEL', k, 'lease_token', 'lease_expires')
  move(id, job.seq, job.status, status)
  redis.call('ZADD', ns .. ':finished', t, id)
  if job.webhook and job.webhook ~= '{}' then redis.call('ZADD', ns .. ':webhooks', 0, id) end  -- due now
  event(id, t, 'status', status, stage, progress, message)
end
local function held(job, token) return job and job.status == 'running' and job.lease_token == token end
"""

# ARGV: ns, id, key, payload_hash, max_attempts, options, inputs, dispatch, metadata, webhook
_CREATE = """
local id, key = ARGV[2], ARGV[3]
if key ~= '' then
  local existing = redis.call('GET', ns .. ':key:' .. key)
  if existing then return {0, existing} end
  redis.call('SET', ns .. ':key:' .. key, id)
end
local k, t = ns .. ':job:' .. id, now()
local seq = redis.call('INCR', ns .. ':seq')
redis.call('HSET', k, 'id', id, 'seq', seq, 'status', 'queued', 'stage', 'queued', 'progress', '0',
  'message', 'waiting for a worker', 'created_at', fmt(t), 'attempts', '0', 'max_attempts', ARGV[5],
  'options', ARGV[6], 'inputs', ARGV[7], 'artifacts', '[]', 'dispatch', ARGV[8], 'dispatched_at', fmt(t),
  'metadata', ARGV[9], 'webhook', ARGV[10])
if key ~= '' then redis.call('HSET', k, 'idempotency_key', key) end
if ARGV[4] ~= '' then redis.call('HSET', k, 'payload_hash', ARGV[4]) end
redis.call('ZADD', ns .. ':jobs', seq, id)
redis.call('ZADD', ns .. ':status:queued', seq, id)
event(id, t, 'status', 'queued', 'queued', 0, 'waiting for a worker')
return {1, id}
"""

# ARGV: ns, id ('' = the oldest queued), dispatch ('' = any), token, pid, host, lease_s
_CLAIM = """
local id = ARGV[2]
if id == '' then
  local first = redis.call('ZRANGE', ns .. ':status:queued', 0, 0)
  if #first == 0 then return false end
  id = first[1]
end
local k = ns .. ':job:' .. id
local job = load(k)
if not job or job.status ~= 'queued' then return false end
if ARGV[3] ~= '' and job.dispatch ~= ARGV[3] then return false end
local t, attempt = now(), tonumber(job.attempts) + 1
local message = 'attempt ' .. attempt .. ' of ' .. job.max_attempts .. ' started by worker pid ' .. ARGV[5]
redis.call('HSET', k, 'status', 'running', 'stage', 'starting', 'progress', '0', 'message', message,
  'attempts', attempt, 'started_at', fmt(t), 'lease_token', ARGV[4], 'lease_expires', fmt(t + tonumber(ARGV[7])),
  'worker_pid', ARGV[5], 'worker_host', ARGV[6])
move(id, job.seq, 'queued', 'running')
event(id, t, 'status', 'running', 'starting', 0, message)
return id
"""

# ARGV: ns, id, token, lease_s
_RENEW = """
local k = ns .. ':job:' .. ARGV[2]
local job = load(k)
if not held(job, ARGV[3]) then return 'lost' end
redis.call('HSET', k, 'lease_expires', fmt(now() + tonumber(ARGV[4])))
if job.cancel_requested_at then return 'cancel' end
return 'held'
"""

# ARGV: ns, id, token, stage, progress, message
_PROGRESS = """
local k = ns .. ':job:' .. ARGV[2]
if not held(load(k), ARGV[3]) then return 0 end
redis.call('HSET', k, 'stage', ARGV[4], 'progress', ARGV[5], 'message', ARGV[6])
event(ARGV[2], now(), 'progress', 'running', ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# ARGV: ns, id, token, status, error code ('' = none), error text, artifacts JSON, result JSON
_FINISH = """
local k = ns .. ':job:' .. ARGV[2]
local job = load(k)
if not held(job, ARGV[3]) then return 0 end
end_job(k, ARGV[2], job, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""

# ARGV: ns, id, cancelled code, cancelled text
_CANCEL = """
local id = ARGV[2]
local k = ns .. ':job:' .. id
local job = load(k)
if not job then return 0 end
if job.status == 'queued' then
  end_job(k, id, job, 'cancelled', ARGV[3], ARGV[4], '[]')
  return {1, job.dispatch or ''}
elseif job.status == 'running' and not job.cancel_requested_at then
  local t = now()
  redis.call('HSET', k, 'cancel_requested_at', fmt(t), 'message', 'cancel requested')
  event(id, t, 'cancel_requested', 'running', job.stage, job.progress,
    'cancel requested; the worker stops at the next stage boundary')
end
return {1, ''}
"""

# ARGV: ns, id
_DELETE = """
local id = ARGV[2]
local k = ns .. ':job:' .. id
local flat = redis.call('HGETALL', k)
if #flat == 0 then return false end
local job = {}
for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
redis.call('DEL', k, ns .. ':events:' .. id)
redis.call('ZREM', ns .. ':jobs', id)
redis.call('ZREM', ns .. ':status:' .. job.status, id)
redis.call('ZREM', ns .. ':finished', id)
if job.idempotency_key and redis.call('GET', ns .. ':key:' .. job.idempotency_key) == id then
  redis.call('DEL', ns .. ':key:' .. job.idempotency_key)
end
return flat
"""

# ARGV: ns, id, token, mode (lost | release), dispatch ('' = may not queue), queued message, worker_lost
# text, cancelled code, cancelled text. Returns the new status, 'would_queue', or nil (lease not held).
_REQUEUE = """
local id = ARGV[2]
local k = ns .. ':job:' .. id
local job = load(k)
if not held(job, ARGV[3]) then return false end
local attempts = tonumber(job.attempts)
if ARGV[4] == 'lost' then
  if job.cancel_requested_at then
    end_job(k, id, job, 'cancelled', ARGV[8], ARGV[9], '[]')
    return 'cancelled'
  end
  if attempts >= tonumber(job.max_attempts) then
    end_job(k, id, job, 'failed', 'worker_lost', ARGV[7], '[]')
    return 'failed'
  end
else
  attempts = math.max(attempts - 1, 0)
end
if ARGV[5] == '' then return 'would_queue' end
local t = now()
redis.call('HSET', k, 'status', 'queued', 'stage', 'queued', 'message', ARGV[6], 'attempts', attempts,
  'dispatch', ARGV[5], 'dispatched_at', fmt(t))
redis.call('HDEL', k, 'lease_token', 'lease_expires')
move(id, job.seq, 'running', 'queued')
event(id, t, 'requeued', 'queued', 'queued', job.progress, ARGV[6])
return 'queued'
"""

# ARGV: ns, id, the dispatch that was lost, the new dispatch
_REDISPATCH = """
local k = ns .. ':job:' .. ARGV[2]
local job = load(k)
if not job or job.status ~= 'queued' or job.dispatch ~= ARGV[3] then return 0 end
local t = now()
redis.call('HSET', k, 'dispatch', ARGV[4], 'dispatched_at', fmt(t))
event(ARGV[2], t, 'requeued', 'queued', job.stage, job.progress, 'queued again: the queue had lost its entry')
return 1
"""


SCRIPTS = {name: _PRELUDE + body for name, body in (
    ("create", _CREATE), ("claim", _CLAIM), ("renew", _RENEW), ("progress", _PROGRESS), ("finish", _FINISH),
    ("cancel", _CANCEL), ("delete", _DELETE), ("requeue", _REQUEUE), ("redispatch", _REDISPATCH))}

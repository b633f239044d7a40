-- POST /score: 10 candidates, users cycling over USERS (default 1000), context hour varying.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local users = tonumber(os.getenv("USERS") or "1000")
local cands = {}
for i = 1, 10 do
  cands[#cands + 1] = string.format(
    '{"id":"task-%d","content":"Task number %d","source":"todoist","features":{"hour_of_day":9,"is_overdue":%s,"task_age_days":%d,"priority":%d}}',
    i, i, (i % 2 == 0) and "true" or "false", i * 2, (i % 4) + 1)
end
local candidates = "[" .. table.concat(cands, ",") .. "]"
local n = 0
-- Each wrk thread starts at its own share of the users and walks them in turn, so that
-- a run of `users` requests touches every user once.
local threads = 0
function setup(thread)
  thread:set("offset", threads * math.floor(users / 2))
  threads = threads + 1
end
request = function()
  n = n + 1
  local body = string.format('{"user_id":"user-%d","candidates":%s,"context":{"hour_of_day":%d,"day_of_week":2}}',
    (n + offset) % users, candidates, n % 24)
  return wrk.format(nil, "/score", nil, body)
end

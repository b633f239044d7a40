-- POST /reward: the prototype's body (no event_id), users cycling over USERS (default 1000).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local users = tonumber(os.getenv("USERS") or "1000")
local rewards = {"1.0", "0.5", "0.0", "-0.5", "-1.0"}
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
  local body = string.format(
    '{"user_id":"user-%d","tip_id":"task-%d","reward":%s,"features":{"hour_of_day":%d,"is_overdue":%s,"task_age_days":%d,"priority":%d}}',
    (n + offset) % users, n % 10 + 1, rewards[n % 5 + 1], n % 24, (n % 2 == 0) and "true" or "false", n % 40, n % 4 + 1)
  return wrk.format(nil, "/reward", nil, body)
end

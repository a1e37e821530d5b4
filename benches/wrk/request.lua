-- One request, shaped by environment variables, repeated by wrk; prints one JSON line at the end.
--   KR_METHOD (GET), KR_PATH (/healthz), KR_TOKEN (bearer token), KR_BODY (JSON body)
wrk.method = os.getenv("KR_METHOD") or "GET"
wrk.path = os.getenv("KR_PATH") or "/healthz"
local token = os.getenv("KR_TOKEN")
local body = os.getenv("KR_BODY")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
if body and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

-- Many users, a random one per request (KR_USERS users):
--   KR_SESSIONS_FILE: one session token per line, line i for user i; the request carries a
--     random line's token (KR_PATH is then the same for all, e.g. /user/api-key?reveal=true).
--   KR_PATH_TEMPLATE: a path with {i} for the user's number (e.g.
--     /service/users/ext:{i}/api-key?reveal=true), sent with the one KR_TOKEN.
-- The requests are formatted at a thread's first request (after wrk's init has set the Host
-- header); each request then picks one at random.
local sessions_file = os.getenv("KR_SESSIONS_FILE")
local template = os.getenv("KR_PATH_TEMPLATE")
if (sessions_file and sessions_file ~= "") or (template and template ~= "") then
  local prepared = nil
  local function prepare()
    prepared = {}
    local function headers(auth)
      local h = {}
      for k, v in pairs(wrk.headers) do h[k] = v end
      if auth then h["Authorization"] = auth end
      return h
    end
    if sessions_file and sessions_file ~= "" then
      for line in io.lines(sessions_file) do
        if line ~= "" then
          prepared[#prepared + 1] = wrk.format(nil, nil, headers("Bearer " .. line))
        end
      end
    else
      local n = tonumber(os.getenv("KR_USERS") or "1000")
      for i = 0, n - 1 do
        local path = string.gsub(template, "{i}", tostring(i))
        prepared[#prepared + 1] = wrk.format(nil, path, headers(nil))
      end
    end
    math.randomseed(os.time() + math.floor(os.clock() * 1e6) + #tostring(prepared))
  end
  request = function()
    if not prepared then prepare() end
    return prepared[math.random(#prepared)]
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"rps":%.1f,"p50_us":%d,"p99_us":%d,"socket_errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end

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

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"rps":%.1f,"p50_us":%d,"p99_us":%d,"socket_errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end

# Sourced by benches/run.sh and benches/cost.sh: the users and keys both measure, on the server
# at $URL. Sets T_REVEAL (a user with one default key, for reveal and the POST) and T_LIST (a
# user with ten keys, for the listing).
api() { curl -sf -X "$1" "$URL$2" -H 'Content-Type: application/json' ${3:+-H "Authorization: Bearer $3"} ${4:+-d "$4"}; }
token_of() { python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])'; }
seed_bench_users() {
  local pw='"password":"correct horse battery"'
  api POST /auth/register "" "{\"email\":\"reveal@example.com\",$pw}" >/dev/null
  api POST /auth/register "" "{\"email\":\"list@example.com\",$pw}" >/dev/null
  T_REVEAL=$(api POST /auth/login "" "{\"email\":\"reveal@example.com\",$pw}" | token_of)
  T_LIST=$(api POST /auth/login "" "{\"email\":\"list@example.com\",$pw}" | token_of)
  api POST /user/api-key "$T_REVEAL" '{"api_key":"sk-bench-0123456789abcdef"}' >/dev/null
  local i
  for i in $(seq 1 10); do
    api POST /user/api-keys "$T_LIST" "{\"provider\":\"p$(( i % 3 ))\",\"api_key\":\"sk-list-$i-0123456789\"}" >/dev/null
  done
}

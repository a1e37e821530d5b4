"""What the scripts of tests/scripts/ share to talk to a keyrack server: starting one on a free
port, and one JSON request over an `http.client` connection. Standard library only."""
import json
import subprocess


def serve(binary, db, env, stderr=subprocess.DEVNULL):
    """Starts `keyrack serve` on port 0; returns (process, host, port) once it is listening."""
    p = subprocess.Popen([binary, "--db", db, "serve", "--listen", "127.0.0.1:0"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                         text=True)
    host, port = p.stdout.readline().strip().rsplit("//", 1)[1].split(":")
    return p, host, int(port)


def request(conn, method, path, body=None, token=None):
    """One request with an optional JSON body and bearer token; returns (status, raw body)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, json.dumps(body) if body is not None else None, headers)
    resp = conn.getresponse()
    return resp.status, resp.read()

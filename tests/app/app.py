"""A small application that uses keyrack as a part of itself (Python standard library only).

It has its own users table and its own login. When a user signs up, the application provisions
them into keyrack with a `write` service token (`PUT /service/users/ext:<its id>`); a user's
OpenAI key is stored in keyrack (`POST /service/users/ext:<id>/api-key`), never in the
application's database. To answer a user's question, the backend reads that user's key with a
`read` service token (`GET /service/users/ext:<id>/api-key?reveal=true`) and calls the
provider with it. Here the provider is a fake one on 127.0.0.1 that answers with a digest of
the key it was called with, so a test can tell whose key was used.

Run: KEYRACK_URL=http://127.0.0.1:8080 KEYRACK_WRITE_TOKEN=krs_… KEYRACK_READ_TOKEN=krs_… \
     python3 tests/app/app.py --db app.db
It prints one line, `app listening on http://HOST:PORT provider http://HOST:PORT`, then serves.

Routes (JSON): POST /signup {email,password}, POST /login {email,password} -> {"session"},
PUT /me/openai-key {api_key} (session), POST /ask {prompt} (session) -> the provider's answer,
DELETE /me (session): the user leaves; keyrack deletes their keys too.
"""
import argparse
import hashlib
import hmac
import http.client
import json
import os
import secrets
import sqlite3
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Keyrack:
    """The application's client of keyrack's service routes."""

    def __init__(self, url, write_token, read_token):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.write_token, self.read_token = write_token, read_token

    def call(self, method, path, token, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            headers = {"Authorization": f"Bearer {token}"}
            data = None
            if body is not None:
                data = json.dumps(body)
                headers["Content-Type"] = "application/json"
            conn.request(method, path, data, headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    @staticmethod
    def user(app_user_id):
        # The application's own id is the user's external id in keyrack.
        return "/service/users/ext:" + urllib.parse.quote(str(app_user_id), safe="")

    def provision(self, app_user_id, email):
        return self.call("PUT", self.user(app_user_id), self.write_token, {"email": email})

    def set_key(self, app_user_id, api_key):
        return self.call("POST", self.user(app_user_id) + "/api-key", self.write_token,
                         {"api_key": api_key})

    def reveal(self, app_user_id):
        status, body = self.call("GET", self.user(app_user_id) + "/api-key?reveal=true",
                                 self.read_token)
        if status != 200 or not body.get("has_key"):
            return None
        return body["api_key"]

    def delete_user(self, app_user_id):
        return self.call("DELETE", self.user(app_user_id), self.write_token)


def fake_provider():
    """An OpenAI-like endpoint on 127.0.0.1: POST /v1/chat/completions with a bearer key answers
    with the key's SHA-256 (never the key) and the prompt it was sent."""

    class Provider(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            auth = self.headers.get("Authorization", "")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if self.path != "/v1/chat/completions" or not auth.startswith("Bearer sk-"):
                self.send_response(401)
                self.end_headers()
                return
            key = auth[len("Bearer "):]
            answer = {"key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                      "echo": body["messages"][-1]["content"]}
            out = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def hash_password(password, salt=None):
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 100_000).hex()
    return f"{salt}${digest}"


def check_password(password, stored):
    salt, _ = stored.split("$", 1)
    return hmac.compare_digest(hash_password(password, salt), stored)


def make_app(db_path, keyrack, provider_port):
    db = sqlite3.connect(db_path, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, "
               "email TEXT UNIQUE NOT NULL, password_hash TEXT NOT NULL)")
    db.commit()
    lock = threading.Lock()
    sessions = {}

    class App(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body=None):
            out = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def body(self):
            n = int(self.headers.get("Content-Length", "0"))
            return json.loads(self.rfile.read(n)) if n else {}

        def session_user(self):
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            return sessions.get(token)

        def do_POST(self):
            if self.path == "/signup":
                b = self.body()
                with lock:
                    try:
                        cur = db.execute("INSERT INTO users(email, password_hash) VALUES (?, ?)",
                                         (b["email"], hash_password(b["password"])))
                    except sqlite3.IntegrityError:
                        return self.reply(409, {"error": "email taken"})
                    user_id = cur.lastrowid
                    status, body = keyrack.provision(user_id, b["email"])
                    if status not in (200, 201):
                        db.rollback()
                        return self.reply(502, {"error": "keyrack", "keyrack": body})
                    db.commit()
                return self.reply(201, {"id": user_id, "keyrack_user": body["user"]})
            if self.path == "/login":
                b = self.body()
                row = db.execute("SELECT id, password_hash FROM users WHERE email = ?",
                                 (b["email"],)).fetchone()
                if not row or not check_password(b["password"], row[1]):
                    return self.reply(401, {"error": "wrong email or password"})
                token = secrets.token_urlsafe(24)
                sessions[token] = row[0]
                return self.reply(200, {"session": token})
            if self.path == "/ask":
                user_id = self.session_user()
                if user_id is None:
                    return self.reply(401, {"error": "log in first"})
                key = keyrack.reveal(user_id)
                if key is None:
                    return self.reply(409, {"error": "set your OpenAI key first"})
                conn = http.client.HTTPConnection("127.0.0.1", provider_port, timeout=10)
                conn.request("POST", "/v1/chat/completions",
                             json.dumps({"model": "fake",
                                         "messages": [{"role": "user",
                                                       "content": self.body()["prompt"]}]}),
                             {"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
                resp = conn.getresponse()
                answer = json.loads(resp.read() or b"null")
                conn.close()
                return self.reply(resp.status, answer)
            self.reply(404, {"error": "no such route"})

        def do_PUT(self):
            if self.path == "/me/openai-key":
                user_id = self.session_user()
                if user_id is None:
                    return self.reply(401, {"error": "log in first"})
                status, body = keyrack.set_key(user_id, self.body()["api_key"])
                return self.reply(200 if status == 200 else 422, body)
            self.reply(404, {"error": "no such route"})

        def do_DELETE(self):
            if self.path == "/me":
                user_id = self.session_user()
                if user_id is None:
                    return self.reply(401, {"error": "log in first"})
                status, _ = keyrack.delete_user(user_id)
                with lock:
                    db.execute("DELETE FROM users WHERE id = ?", (user_id,))
                    db.commit()
                for t in [t for t, u in sessions.items() if u == user_id]:
                    del sessions[t]
                return self.reply(204 if status in (204, 404) else 502)
            self.reply(404, {"error": "no such route"})

    return App


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="the application's own SQLite file")
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args()
    keyrack = Keyrack(os.environ["KEYRACK_URL"], os.environ["KEYRACK_WRITE_TOKEN"],
                      os.environ["KEYRACK_READ_TOKEN"])
    provider = fake_provider()
    host, port = args.listen.rsplit(":", 1)
    app = ThreadingHTTPServer((host, int(port)),
                              make_app(args.db, keyrack, provider.server_address[1]))
    a, pr = app.server_address, provider.server_address
    print(f"app listening on http://{a[0]}:{a[1]} provider http://{pr[0]}:{pr[1]}", flush=True)
    try:
        app.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

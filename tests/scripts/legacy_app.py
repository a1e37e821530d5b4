#!/usr/bin/env python3
"""Builds the SQLite database of a typical Python web application that keeps each user's OpenAI
key in a column of its `users` table: the schema SQLAlchemy writes for such a model, keys in
plaintext or as Fernet tokens made with the `cryptography` package, passwords hashed with the
`bcrypt` package (and others with `argon2-cffi`, and in the formats of Werkzeug's scrypt and
pbkdf2:sha256, Django's pbkdf2_sha256 and passlib's pbkdf2-sha256, made with Python's
hashlib). keyrack's `import-legacy` and `export-legacy` tests read what this script writes, and
`decode` reads back what `export-legacy` wrote; nothing here uses keyrack's code.

    python3 tests/scripts/legacy_app.py --venv DIR setup
    python3 tests/scripts/legacy_app.py --venv DIR rows --out APP.db < rows.json
    python3 tests/scripts/legacy_app.py --venv DIR bulk --out APP.db --users N \
        --fernet-keys K1,K2 --manifest M.json
    python3 tests/scripts/legacy_app.py --venv DIR decode --db APP.db --fernet-keys K1,K2

The script runs itself inside a virtual environment at DIR, which it creates and fills with
`cryptography`, `bcrypt` and `argon2-cffi` from PyPI the first time. Exit 3: Python's `venv`
module or the packages are unavailable (the caller may skip).

`rows` reads a JSON list of rows: {"id": 1, "email": "a@b.c" | null, "key": K, "password": P}
with K one of null, {"plain": "sk-…"}, {"fernet": "sk-…", "with": 0, "blob": false},
{"raw": "any text"} and P one of null, {"bcrypt": "pw", "prefix": "$2b$"}, {"argon2": "pw"},
{"pbkdf2": "pw"} (passlib), {"werkzeug_scrypt": "pw"}, {"werkzeug_pbkdf2": "pw"},
{"django": "pw"}, {"raw": "text"}. `with` is the index of the Fernet key in --fernet-keys.

`decode` prints, as JSON, every row's id and its key column decoded as the application would
read it: {"id": 1, "key": "sk-…" | null, "stored": "plaintext" | "fernet" | "null"}; a value that
is neither: exit 1.

`bulk` writes N users with a mix of every format (`--all-fernet`: every key a Fernet token) and
a manifest (JSON) of what each user's password and key are, for the test to check against.
"""

import argparse
import base64
import hashlib
import json
import os
import sqlite3
import subprocess
import sys

PACKAGES = ["cryptography", "bcrypt", "argon2-cffi"]

# The DDL SQLAlchemy emits for a declarative `User` model of such an application.
SCHEMA = """
CREATE TABLE users (
	id INTEGER NOT NULL,
	email VARCHAR(255),
	hashed_password VARCHAR(255),
	openai_api_key TEXT,
	is_active BOOLEAN,
	created_at DATETIME DEFAULT (CURRENT_TIMESTAMP),
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_users_email ON users (email);
CREATE TABLE projects (
	id INTEGER NOT NULL,
	owner_id INTEGER,
	name VARCHAR(100),
	PRIMARY KEY (id),
	FOREIGN KEY(owner_id) REFERENCES users (id)
);
"""


def in_venv(venv):
    return os.path.realpath(sys.prefix) == os.path.realpath(venv)


def ensure_venv(venv):
    """Creates the virtual environment and installs the packages once; then re-runs this
    script with its interpreter."""
    python = os.path.join(venv, "bin", "python")
    ready = os.path.join(venv, ".keyrack-ready")
    if not os.path.exists(ready):
        try:
            import venv as _venv  # noqa: F401
        except ImportError:
            print("python3 has no venv module", file=sys.stderr)
            sys.exit(3)
        r = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"python3 -m venv failed: {r.stderr.strip()}", file=sys.stderr)
            sys.exit(3)
        r = subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"] + PACKAGES,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            print(f"pip install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
            sys.exit(3)
        with open(ready, "w") as f:
            f.write("ok\n")
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])


def ab64(raw):
    """passlib's adapted base64: standard alphabet with '.' for '+', no padding."""
    return base64.b64encode(raw).decode().rstrip("=").replace("+", ".")


def pbkdf2_sha256(password, rounds=1000):
    """passlib's `pbkdf2_sha256.hash`: 16 random salt bytes, a 32-byte checksum, both ab64."""
    salt = os.urandom(16)
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds)
    return f"$pbkdf2-sha256${rounds}${ab64(salt)}${ab64(dk)}"


def text_salt():
    """Werkzeug's gen_salt(16) and Django's salts: letters and digits, used as their text."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(alphabet[b % len(alphabet)] for b in os.urandom(16))


def werkzeug_scrypt(password, n=1024, r=8, p=1):
    """Werkzeug 3's `generate_password_hash` with method scrypt (its default is
    scrypt:32768:8:1): a 64-byte key in hexadecimal."""
    salt = text_salt()
    dk = hashlib.scrypt(password.encode(), salt=salt.encode(), n=n, r=r, p=p, maxmem=132 * 1024 * 1024)
    return f"scrypt:{n}:{r}:{p}${salt}${dk.hex()}"


def werkzeug_pbkdf2(password, iterations=1000):
    """Werkzeug's method pbkdf2:sha256:<iterations> (its default: 1,000,000 since 3.1)."""
    salt = text_salt()
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2:sha256:{iterations}${salt}${dk.hex()}"


def django_pbkdf2(password, iterations=1000):
    """Django's PBKDF2PasswordHasher: pbkdf2_sha256$<iterations>$<salt>$<standard base64>."""
    salt = text_salt()
    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(dk).decode()}"


FORMS = {
    "bcrypt": None,
    "argon2": None,
    "pbkdf2": pbkdf2_sha256,
    "werkzeug_scrypt": werkzeug_scrypt,
    "werkzeug_pbkdf2": werkzeug_pbkdf2,
    "django": django_pbkdf2,
}


class Hashes:
    """Password hashing with low costs (a test builds thousands), one hash per distinct
    password and form."""

    def __init__(self):
        import bcrypt
        from argon2 import PasswordHasher

        self.bcrypt = bcrypt
        self.argon2 = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        self.cache = {}

    def make(self, spec):
        if spec is None:
            return None
        if "raw" in spec:
            return spec["raw"]
        form = next(k for k in FORMS if k in spec)
        pw = spec[form]
        prefix = spec.get("prefix", "$2b$")
        cache_key = (form, pw, prefix)
        if cache_key not in self.cache:
            if form == "bcrypt":
                h = self.bcrypt.hashpw(pw.encode(), self.bcrypt.gensalt(rounds=4)).decode()
                h = prefix + h[4:]
            elif form == "argon2":
                h = self.argon2.hash(pw)
            else:
                h = FORMS[form](pw)
            self.cache[cache_key] = h
        return self.cache[cache_key]


def make_key(spec, fernets):
    if spec is None:
        return None
    if "plain" in spec:
        return spec["plain"]
    if "raw" in spec:
        return spec["raw"]
    token = fernets[spec.get("with", 0)].encrypt(spec["fernet"].encode())
    return token if spec.get("blob") else token.decode()


def create(out):
    if os.path.exists(out):
        os.remove(out)
    db = sqlite3.connect(out)
    db.executescript(SCHEMA)
    return db


def insert(db, rows):
    db.executemany(
        "INSERT INTO users (id, email, hashed_password, openai_api_key, is_active) VALUES (?, ?, ?, ?, 1)",
        rows,
    )


def cmd_rows(args, fernets):
    spec = json.load(sys.stdin)
    hashes = Hashes()
    db = create(args.out)
    insert(
        db,
        [(r["id"], r.get("email"), hashes.make(r.get("password")), make_key(r.get("key"), fernets)) for r in spec],
    )
    db.commit()
    db.close()


def cmd_bulk(args, fernets):
    """User i: email `User<i>@Example.com` (mixed case, lowercased by keyrack); key: none for
    every 10th, plaintext for 3 in 10, otherwise a Fernet token under one of the keys in turn;
    password: bcrypt from a pool of 64 (prefixes $2a$/$2b$/$2y$ in turn), argon2 for every 50th,
    passlib pbkdf2-sha256 for every 100th."""
    hashes = Hashes()
    db = create(args.out)
    manifest = []
    rows = []
    for i in range(1, args.users + 1):
        email = f"User{i}@Example.com"
        if i % 100 == 0:
            pw = f"pbkdf2 pass {i % 7}"
            pspec, form = {"pbkdf2": pw}, "pbkdf2"
        elif i % 50 == 0:
            pw = f"argon2 pass {i % 7}"
            pspec, form = {"argon2": pw}, "argon2"
        else:
            pw = f"bcrypt pass {i % 64}"
            prefix = ["$2a$", "$2b$", "$2y$"][i % 3]
            pspec, form = {"bcrypt": pw, "prefix": prefix}, "bcrypt"
        plain = f"sk-proj-{i:08d}-{hashlib.sha256(str(i).encode()).hexdigest()[:24]}"
        if args.all_fernet:
            kspec = {"fernet": plain, "with": i % len(fernets)}
        elif i % 10 == 0:
            kspec, plain = None, None
        elif i % 10 in (1, 2, 3):
            kspec = {"plain": plain}
        else:
            kspec = {"fernet": plain, "with": i % len(fernets) if fernets else 0}
        rows.append((i, email, hashes.make(pspec), make_key(kspec, fernets)))
        manifest.append({"id": i, "email": email.lower(), "password": pw, "form": form, "key": plain})
        if len(rows) == 5000:
            insert(db, rows)
            rows = []
    insert(db, rows)
    db.commit()
    db.close()
    with open(args.manifest, "w") as f:
        json.dump(manifest, f)


def cmd_decode(args, fernets):
    """Reads the key column back as the application would: a Fernet token is decrypted with
    the application's keys; anything else is taken as a plaintext key."""
    from cryptography.fernet import InvalidToken

    db = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    out = []
    for row_id, value in db.execute("SELECT id, openai_api_key FROM users ORDER BY id"):
        if value is None:
            out.append({"id": row_id, "key": None, "stored": "null"})
            continue
        text = value.decode() if isinstance(value, bytes) else value
        if text.startswith("gAAAAA"):
            key = None
            for f in fernets:
                try:
                    key = f.decrypt(text.encode()).decode()
                    break
                except InvalidToken:
                    continue
            if key is None:
                print(f"row {row_id}: a Fernet token no key opens", file=sys.stderr)
                sys.exit(1)
            out.append({"id": row_id, "key": key, "stored": "fernet"})
        elif text.startswith("kr1:"):
            print(f"row {row_id}: a value sealed by keyrack, unreadable here", file=sys.stderr)
            sys.exit(1)
        else:
            out.append({"id": row_id, "key": text, "stored": "plaintext"})
    db.close()
    json.dump(out, sys.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup")
    r = sub.add_parser("rows")
    r.add_argument("--out", required=True)
    r.add_argument("--fernet-keys", default="")
    b = sub.add_parser("bulk")
    b.add_argument("--out", required=True)
    b.add_argument("--users", type=int, required=True)
    b.add_argument("--fernet-keys", default="")
    b.add_argument("--manifest", required=True)
    b.add_argument("--all-fernet", action="store_true", help="every user's key as a Fernet token")
    d = sub.add_parser("decode")
    d.add_argument("--db", required=True)
    d.add_argument("--fernet-keys", default="")
    args = p.parse_args()

    if not in_venv(args.venv):
        ensure_venv(args.venv)
    if args.cmd == "setup":
        return
    from cryptography.fernet import Fernet

    fernets = [Fernet(k.encode()) for k in args.fernet_keys.split(",") if k]
    if args.cmd == "rows":
        cmd_rows(args, fernets)
    elif args.cmd == "decode":
        cmd_decode(args, fernets)
    else:
        cmd_bulk(args, fernets)


if __name__ == "__main__":
    main()

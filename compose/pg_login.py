"""`make up`'s readiness: a real login through the published port, with the Python standard library only.

The healthcheck (pg_isready inside the container) says a server answers on the container's own loopback. It
said so for a cluster whose initialisation a stop had cut short (no listen_addresses = '*': Docker's proxy
accepted each connection on the published port, found nothing behind it and closed it, "server closed the
connection unexpectedly"), and it cannot say that the user, password and database work. So `make up` declares
the stack ready once this logs in as the container's POSTGRES_USER, with its POSTGRES_PASSWORD, to its
POSTGRES_DB, on the host port, and reads the server's ReadyForQuery. No psycopg: `make up` runs without the venv.

    python3 compose/pg_login.py HOST PORT USER DATABASE SECONDS   (the password in $PGPASSWORD)

Exit 0 once a login succeeds; 1 with one line on stderr when the server refuses it (a wrong password, a missing
database: no point waiting) or nothing lets us in within SECONDS (the last reason said).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import socket
import struct
import sys
import time

# Worth waiting through: the server is still starting, or going down to start again.
RETRYABLE_SQLSTATES = frozenset({"57P03", "57P01", "57P02", "53300"})


class Refused(Exception):
    """The server answered and said no: waiting will not change it."""


class NotYet(Exception):
    """Nothing that logs us in is there yet (refused, reset, closed without a word, starting up)."""


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def receive(sock: socket.socket) -> tuple[bytes, bytes]:
    header = read_exactly(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], read_exactly(sock, length - 4)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise NotYet("the server closed the connection unexpectedly")
        data += chunk
    return data


def error_fields(body: bytes) -> dict[str, str]:
    return {part[:1].decode(): part[1:].decode(errors="replace") for part in body.split(b"\0") if part}


def scram(sock: socket.socket, password: str) -> None:
    """SCRAM-SHA-256 (RFC 5802/7677), as libpq speaks it: no channel binding, the user name from the startup."""
    nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    first_bare = f"n=,r={nonce}"
    initial = f"n,,{first_bare}".encode()
    sock.sendall(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(initial)) + initial))
    server_first = expect_auth(sock, 11).decode()
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise Refused("the server's SCRAM nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    final_bare = f"c=biws,r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{final_bare}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    sock.sendall(message(b"p", f"{final_bare},p={base64.b64encode(proof).decode()}".encode()))
    server_final = expect_auth(sock, 12).decode()
    server_signature = hmac.digest(hmac.digest(salted, b"Server Key", "sha256"), auth_message, "sha256")
    if server_final != f"v={base64.b64encode(server_signature).decode()}":
        raise Refused("the server's SCRAM signature is wrong")


def expect_auth(sock: socket.socket, code: int) -> bytes:
    """The body after the code of the next Authentication message, which must carry ``code``."""
    kind, body = receive(sock)
    if kind == b"E":
        raise_error(body)
    (got,) = struct.unpack("!i", body[:4])
    if kind != b"R" or got != code:
        raise Refused(f"unexpected message {kind!r} {got} during authentication")
    return body[4:]


def raise_error(body: bytes) -> None:
    fields = error_fields(body)
    text = f"{fields.get('S', 'ERROR')}: {fields.get('M', '')} (SQLSTATE {fields.get('C', '?')})"
    raise (NotYet if fields.get("C") in RETRYABLE_SQLSTATES else Refused)(text)


def login(host: str, port: int, user: str, database: str, password: str) -> None:
    """Log in and wait for ReadyForQuery; Refused or NotYet says why not."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            params = b"".join(f"{k}\0{v}\0".encode() for k, v in (("user", user), ("database", database)))
            sock.sendall(struct.pack("!ii", len(params) + 9, 196608) + params + b"\0")
            while True:
                kind, body = receive(sock)
                if kind == b"E":
                    raise_error(body)
                elif kind == b"Z":
                    sock.sendall(message(b"X", b""))
                    return
                elif kind == b"R":
                    (code,) = struct.unpack("!i", body[:4])
                    if code == 3:
                        sock.sendall(message(b"p", password.encode() + b"\0"))
                    elif code == 5:
                        inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                        digest = hashlib.md5(inner + body[4:8]).hexdigest()
                        sock.sendall(message(b"p", f"md5{digest}\0".encode()))
                    elif code == 10:
                        if b"SCRAM-SHA-256\0" not in body[4:]:
                            raise Refused(f"the server offers no SCRAM-SHA-256: {body[4:]!r}")
                        scram(sock, password)
                    elif code != 0:
                        raise Refused(f"authentication method {code} is not one this check speaks")
    except OSError as exc:  # refused, reset, timed out: Docker's proxy or the server not there yet
        raise NotYet(str(exc) or type(exc).__name__) from exc


def main(argv: list[str]) -> int:
    host, port, user, database, seconds = argv
    deadline = time.monotonic() + float(seconds)
    where = f"postgres on {host}:{port} (user {user}, database {database})"
    while True:
        try:
            login(host, int(port), user, database, os.environ.get("PGPASSWORD", ""))
            return 0
        except Refused as exc:
            print(f"{where} refused the login: {exc}", file=sys.stderr)
            return 1
        except NotYet as exc:
            if time.monotonic() >= deadline:
                print(f"{where} let no login in within {seconds} s: {exc}", file=sys.stderr)
                return 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

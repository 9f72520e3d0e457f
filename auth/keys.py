"""Signing keys: Ed25519 key files in one folder, identified by `kid`; and the transcripts' key beside them.

Each key is `<kid>.pem` (PKCS#8 private key, mode 0600) in a folder of mode
0700. Kids start with a UTC timestamp, so the newest key sorts last: it
signs; all of them verify. Rotation adds a key; retiring deletes one, and the
tokens it signed fail from the next request. The folder is re-read when it
changes, so a running service sees rotations without a restart.

The transcripts' key (auth.transcripts) is `transcripts-<kid>.key` in the
same folder: 32 random bytes (AES-256-GCM), base64, mode 0600, made by
`keys generate` (or on first need) and copied to every app server with the
signing keys. Several may be there: the newest encrypts, each decrypts what
it encrypted (every row names its kid).
"""

import base64

import os
import secrets
import stat
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ALGORITHM = "EdDSA"
TRANSCRIPT_KEY_PREFIX = "transcripts-"
TRANSCRIPT_KEY_SUFFIX = ".key"


class KeyFolderError(Exception):
    """A key folder problem an operator must fix; the message says which."""


def _new_kid(now=None):
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def _write_key(key_dir, kid):
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = Path(key_dir) / f"{kid}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return kid


def _ensure_dir(key_dir):
    key_dir = Path(key_dir)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    return key_dir


def generate(key_dir):
    """Create the first key; refuse if the folder already holds keys (never overwrite)."""
    key_dir = _ensure_dir(key_dir)
    if list(key_dir.glob("*.pem")):
        raise KeyFolderError(f"{key_dir} already holds keys; use `keys rotate` to add one")
    kid = _write_key(key_dir, _new_kid())
    transcript_key(key_dir)
    return kid


def rotate(key_dir):
    """Add a new signing key; older keys keep verifying until retired."""
    key_dir = _ensure_dir(key_dir)
    if not list(key_dir.glob("*.pem")):
        raise KeyFolderError(f"{key_dir} holds no keys; use `keys generate` first")
    return _write_key(key_dir, _new_kid())


def retire(key_dir, kid):
    """Delete one key; tokens it signed are refused from then on."""
    kids = list_kids(key_dir)
    if kid not in kids:
        raise KeyFolderError(f"no key with kid {kid!r}")
    if len(kids) == 1:
        raise KeyFolderError(f"{kid} is the only key; rotate first, then retire it")
    (Path(key_dir) / f"{kid}.pem").unlink()


def transcript_key(key_dir):
    """The kid of the newest transcripts' key, making the first one when there is none (never overwriting: two
    processes making it at once keep the first)."""
    key_dir = _ensure_dir(key_dir)
    kids = transcript_kids(key_dir)
    if kids:
        return kids[-1]
    kid = _new_kid()
    path = key_dir / f"{TRANSCRIPT_KEY_PREFIX}{kid}{TRANSCRIPT_KEY_SUFFIX}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return transcript_kids(key_dir)[-1]
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
    return kid


def transcript_kids(key_dir):
    """The kids of the transcripts' keys in the folder, oldest first."""
    names = (p.name for p in Path(key_dir).glob(f"{TRANSCRIPT_KEY_PREFIX}*{TRANSCRIPT_KEY_SUFFIX}"))
    return sorted(n[len(TRANSCRIPT_KEY_PREFIX):-len(TRANSCRIPT_KEY_SUFFIX)] for n in names)


def read_transcript_key(key_dir, kid):
    """The 32 bytes of transcripts' key `kid`; KeyFolderError when it is missing, unsafe or not a key."""
    path = Path(key_dir) / f"{TRANSCRIPT_KEY_PREFIX}{kid}{TRANSCRIPT_KEY_SUFFIX}"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise KeyFolderError(f"VIBE_JWT_KEY_DIR: no transcripts key {kid!r} in {key_dir} (copy it from the "
                             "server that made it)") from None
    if mode & 0o077:
        raise KeyFolderError(f"VIBE_JWT_KEY_DIR: {path} is mode {mode:04o}; it must be 0600")
    try:
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise KeyFolderError(f"VIBE_JWT_KEY_DIR: {path} is not a transcripts key (32 bytes, base64)")
    return key


def list_kids(key_dir):
    """Kids in the folder, oldest first."""
    return sorted(p.stem for p in Path(key_dir).glob("*.pem"))


class KeySet:
    """The keys of a folder, re-read whenever the folder changes."""

    def __init__(self, key_dir):
        self.key_dir = Path(key_dir)
        self._stamp = None
        self._private = {}
        self.reload()
        if not self._private:
            raise KeyFolderError(f"VIBE_JWT_KEY_DIR: no signing key in {self.key_dir}; "
                            "run `vibethinker-admin keys generate`")

    def reload(self):
        """Re-read the folder if it changed since the last read."""
        try:
            stamp = self.key_dir.stat().st_mtime_ns
        except FileNotFoundError:
            raise KeyFolderError(f"VIBE_JWT_KEY_DIR: {self.key_dir} does not exist; "
                            "run `vibethinker-admin keys generate`") from None
        if stamp == self._stamp:
            return
        keys = {}
        for path in sorted(self.key_dir.glob("*.pem")):
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise KeyFolderError(f"VIBE_JWT_KEY_DIR: {path} is mode {mode:04o}; it must be 0600")
            keys[path.stem] = serialization.load_pem_private_key(path.read_bytes(), password=None)
        self._private, self._stamp = keys, stamp

    @property
    def signing_kid(self):
        return max(self._private)

    def signing_key(self):
        """(kid, private key) of the newest key."""
        self.reload()
        kid = self.signing_kid
        return kid, self._private[kid]

    def holds(self, kid):
        """True while `kid` is in the folder (one stat when nothing changed)."""
        self.reload()
        return kid in self._private

    def public_key(self, kid):
        """The public key for `kid`, or None if no such key (retired or never made)."""
        self.reload()
        key = self._private.get(kid)
        return key.public_key() if key else None

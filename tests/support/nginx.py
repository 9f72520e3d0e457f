"""Real nginx from the project's template, with a certificate made here: the tests' and the bench's front."""

import datetime
import ipaddress
import os
import shutil
import subprocess
import time

import jinja2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.servers import ROOT


def nginx_binary():
    """The nginx program; a missing one fails the test."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not found:
        pytest.fail("nginx is missing: `make test` installs Debian's nginx as root")
    return found


def certificate_pair(name, addresses=()):
    """A self-signed certificate for the host `name` (and the IP `addresses`) and its key, made in memory:
    (certificate PEM, key PEM) as text."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(name), *(x509.IPAddress(ipaddress.ip_address(address)) for address in addresses)]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def make_certificate(folder):
    """A self-signed certificate for localhost and 127.0.0.1 in `folder`: (cert path, key path)."""
    cert, key = certificate_pair("localhost", ["127.0.0.1"])
    (folder / "cert.pem").write_text(cert)
    (folder / "key.pem").write_text(key)
    return folder / "cert.pem", folder / "key.pem"


def render(**values):
    """The project's nginx site template (nginx/vibethinker.conf.j2) rendered with `values`."""
    template = jinja2.Environment(loader=jinja2.FileSystemLoader(ROOT / "nginx"), undefined=jinja2.StrictUndefined,
                                  keep_trailing_newline=True).get_template("vibethinker.conf.j2")
    return template.render(**values)


class Nginx:
    """nginx in the foreground serving `site`, its config, pid, logs and temp files in `folder`."""

    def __init__(self, folder, site, connections=256):
        self.folder = folder
        (folder / "site.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (folder / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
            f"events {{ worker_connections {connections}; }}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {folder}/body;\n  proxy_temp_path {folder}/proxy;\n"
            f"  fastcgi_temp_path {folder}/fcgi;\n  uwsgi_temp_path {folder}/uwsgi;\n  scgi_temp_path {folder}/scgi;\n"
            f"  include {folder}/site.conf;\n}}\n")
        self.proc = None

    def test_config(self):
        return subprocess.run([nginx_binary(), "-t", "-c", str(self.folder / "nginx.conf"), "-p", str(self.folder)],
                              capture_output=True, text=True)

    def start(self):
        self.proc = subprocess.Popen([nginx_binary(), "-c", str(self.folder / "nginx.conf"), "-p", str(self.folder),
                                      "-g", "daemon off;"], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        assert self.proc.poll() is None, (self.folder / "error.log").read_text()
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

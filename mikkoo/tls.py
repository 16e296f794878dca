"""Build the TLS context for the RabbitMQ connection and explain failed handshakes.

:func:`client_context` turns ``rabbitmq/ssl_options`` into an
:class:`ssl.SSLContext` and raises :class:`TLSConfigError` naming the
option and file at fault. :func:`describe_handshake_failure` turns the
error of a failed pika connection into one line that explains why the
TLS handshake failed and what to check.
"""
from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# Certificate verification results, from OpenSSL's include/openssl/x509_vfy.h.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64

# OpenSSL reasons for a peer that does not speak TLS on that port, such as
# RabbitMQ's plain AMQP listener, which replies to a ClientHello with the
# AMQP protocol header and closes the connection.
NOT_TLS_REASONS = frozenset({'WRONG_VERSION_NUMBER', 'PACKET_LENGTH_TOO_LONG',
                             'RECORD_LAYER_FAILURE', 'HTTP_REQUEST'})
# The reason of a connection closed in the middle of the handshake.
EOF_REASONS = frozenset({'UNEXPECTED_EOF_WHILE_READING'})
# TLS alerts of a server that requires a client certificate and got none.
CERTIFICATE_REQUIRED_REASONS = frozenset({'TLSV13_ALERT_CERTIFICATE_REQUIRED'})
# TLS alerts of a server that rejected the client certificate sent.
CLIENT_CERTIFICATE_REJECTED_REASONS = frozenset({
    'TLSV1_ALERT_UNKNOWN_CA', 'SSLV3_ALERT_BAD_CERTIFICATE',
    'SSLV3_ALERT_CERTIFICATE_UNKNOWN', 'SSLV3_ALERT_CERTIFICATE_EXPIRED',
    'SSLV3_ALERT_UNSUPPORTED_CERTIFICATE', 'TLSV1_ALERT_ACCESS_DENIED'})
# Reasons for a handshake that found no protocol version in common.
PROTOCOL_VERSION_REASONS = frozenset({'UNSUPPORTED_PROTOCOL', 'NO_PROTOCOLS_AVAILABLE',
                                      'TLSV1_ALERT_PROTOCOL_VERSION'})

# pika keeps only the text of an SSL error that ends the connection after
# the handshake (a TLS 1.3 server checks the client certificate then), so
# the OpenSSL reason is also looked for in the text: "[SSL: REASON] text (_ssl.c".
SSL_REASON_IN_TEXT = re.compile(r'\[SSL: (?P<reason>[A-Z0-9_]+)\] (?P<text>[^(\'"]*)')
# An SSLEOFError as it appears in that text. A server that rejects the
# client certificate and resets the connection at once can cause one,
# because the reset discards its alert before the client reads it.
SSL_EOF_IN_TEXT = re.compile(r'SSLEOFError\(\d+, [\'"](?P<text>[^(\'"]*)')

# File names OpenSSL looks up in a CA directory: the subject hash, a dot
# and a number, as made by ``openssl rehash``.
HASHED_CA_NAME = re.compile(r'^[0-9a-f]{8}\.r?[0-9]+$')


# ssl.PROTOCOL_* names and their numbers, which ssl_options.protocol takes.
PROTOCOLS = {name: int(getattr(ssl, name)) for name in dir(ssl)
             if name.startswith('PROTOCOL_')}


class TLSConfigError(Exception):
    """Raised when ``ssl_options`` name a file or value that cannot be used."""


# -- checking and building the context ---------------------------------------

def check_options(options: Mapping[str, Any]) -> list[str]:
    """Return one problem per ``ssl_options`` value of the wrong type or range.

    Reads no file, so that a configuration can be checked before the files
    it names are in place. Problems start with "ssl_options.KEY".
    """
    problems = []
    for key, check in _VALUE_CHECKS.items():
        if options.get(key) is not None:
            try:
                check(options[key])
            except TLSConfigError as error:
                problems.append(str(error))
    return problems


def client_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """Return a client SSLContext that verifies the server against the CAs given.

    The server certificate is always verified: against ``ca_certs``,
    ``ca_path`` and ``ca_data`` when any is set, else against the system's
    CAs. Its host name is checked unless ``verify_hostname`` is false.
    Reads the files named in ``options``. Raises TLSConfigError naming the
    option and file at fault.
    """
    problems = check_options(options)
    if problems:
        raise TLSConfigError('; '.join(problems))
    # An empty YAML value (None) means the default, as an absent key does.
    protocol = _protocol_number(options.get('protocol') or ssl.PROTOCOL_TLS_CLIENT)
    try:
        context = ssl.SSLContext(protocol)
    except (ValueError, OSError) as error:
        raise TLSConfigError(f'ssl_options.protocol {protocol} is not usable with '
                             f'{ssl.OPENSSL_VERSION}: {error}') from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = options.get('verify_hostname') is not False

    _load_verify_locations(context, options)
    if options.get('certfile') is not None:
        _load_cert_chain(context, options)
    elif options.get('keyfile') is not None:
        raise TLSConfigError('ssl_options.keyfile is set but certfile is not; set '
                             'ssl_options.certfile to the client certificate')
    if options.get('ciphers') is not None:
        _set_ciphers(context, options['ciphers'])
    return context


def _protocol_number(value: Any) -> int:
    number = PROTOCOLS.get(value, value) if isinstance(value, str) else value
    if isinstance(number, bool) or number not in PROTOCOLS.values():
        raise TLSConfigError(f'ssl_options.protocol must be an ssl.PROTOCOL_* number or '
                             f'name such as {int(ssl.PROTOCOL_TLS_CLIENT)} or '
                             f'PROTOCOL_TLS_CLIENT, got {value!r}')
    if number == ssl.PROTOCOL_TLS_SERVER:
        raise TLSConfigError(f'ssl_options.protocol {value!r} is PROTOCOL_TLS_SERVER, '
                             f'which only servers can use; leave protocol unset for '
                             f'PROTOCOL_TLS_CLIENT')
    return int(number)


def _check_verify_hostname(value: Any) -> None:
    # A string such as "no" would be true in Python, so only YAML's true and
    # false are accepted: turning the check off must be explicit.
    if not isinstance(value, bool):
        raise TLSConfigError(f'ssl_options.verify_hostname must be true or false, '
                             f'got {value!r}')


def _check_path(key: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise TLSConfigError(f'ssl_options.{key} must be a path, got {value!r}')
    return check


def _check_ca_data(value: Any) -> None:
    if not isinstance(value, (str, bytes)) or not value:
        raise TLSConfigError(f'ssl_options.ca_data must be PEM text, got a value of '
                             f'type {type(value).__name__}')


def _check_password(value: Any) -> None:
    # The value is a secret, so only its type is named.
    if not isinstance(value, (str, bytes)):
        raise TLSConfigError(f'ssl_options.password must be a string (quote it in '
                             f'YAML), got a value of type {type(value).__name__}')


def _check_ciphers(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TLSConfigError(f'ssl_options.ciphers must be an OpenSSL cipher list such '
                             f'as "ECDHE+AESGCM", got {value!r}')


_VALUE_CHECKS: dict[str, Callable[[Any], Any]] = {
    'ca_certs': _check_path('ca_certs'),
    'ca_path': _check_path('ca_path'),
    'ca_data': _check_ca_data,
    'certfile': _check_path('certfile'),
    'keyfile': _check_path('keyfile'),
    'password': _check_password,
    'ciphers': _check_ciphers,
    'protocol': _protocol_number,
    'verify_hostname': _check_verify_hostname,
}


def _read_file(key: str, path: str) -> bytes:
    """Return the contents of the file that ssl_options.KEY names."""
    try:
        with open(path, 'rb') as handle:
            return handle.read()
    except FileNotFoundError:
        raise TLSConfigError(f'ssl_options.{key}: file not found: {path}') from None
    except IsADirectoryError:
        raise TLSConfigError(f'ssl_options.{key}: {path} is a directory, not a '
                             f'file') from None
    except OSError as error:
        raise TLSConfigError(f'ssl_options.{key}: cannot read {path}: '
                             f'{error.strerror or error}') from None


def _check_ca_directory(path: str) -> None:
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        raise TLSConfigError(f'ssl_options.ca_path: directory not found: {path}') from None
    except NotADirectoryError:
        raise TLSConfigError(f'ssl_options.ca_path: {path} is not a directory; use '
                             f'ssl_options.ca_certs for a file') from None
    except OSError as error:
        raise TLSConfigError(f'ssl_options.ca_path: cannot read {path}: '
                             f'{error.strerror or error}') from None
    # OpenSSL reads the directory only during a handshake, and it finds a CA
    # there only under its hashed name, so without one every handshake fails.
    if not any(HASHED_CA_NAME.match(name) for name in names):
        raise TLSConfigError(f'ssl_options.ca_path: {path} contains no certificates named '
                             f'by subject hash; run "openssl rehash {path}"')


def _load_verify_locations(context: ssl.SSLContext, options: Mapping[str, Any]) -> None:
    cafile = options.get('ca_certs')
    capath = options.get('ca_path')
    cadata = options.get('ca_data')
    if cafile is None and capath is None and cadata is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return

    if cafile is not None:
        _read_file('ca_certs', cafile)
        try:
            context.load_verify_locations(cafile=cafile)
        except ssl.SSLError as error:
            raise TLSConfigError(f'ssl_options.ca_certs: {cafile} contains no valid PEM '
                                 f'certificate: {_ssl_text(error)}') from None
    if capath is not None:
        _check_ca_directory(capath)
        context.load_verify_locations(capath=capath)
    if cadata is not None:
        try:
            context.load_verify_locations(cadata=cadata)
        except ssl.SSLError as error:
            raise TLSConfigError(f'ssl_options.ca_data contains no valid PEM certificate: '
                                 f'{_ssl_text(error)}') from None


def _load_cert_chain(context: ssl.SSLContext, options: Mapping[str, Any]) -> None:
    certfile = options['certfile']
    key_option = 'keyfile' if options.get('keyfile') is not None else 'certfile'
    keyfile = options[key_option]
    if b'-----BEGIN CERTIFICATE-----' not in _read_file('certfile', certfile):
        raise TLSConfigError(f'ssl_options.certfile: {certfile} contains no PEM '
                             f'certificate')
    key_pem = _read_file(key_option, keyfile)
    if b'PRIVATE KEY-----' not in key_pem:
        raise TLSConfigError(f'ssl_options.{key_option}: {keyfile} contains no PEM '
                             f'private key')
    encrypted = (b'-----BEGIN ENCRYPTED PRIVATE KEY-----' in key_pem
                 or b'Proc-Type: 4,ENCRYPTED' in key_pem)
    try:
        context.load_cert_chain(certfile, keyfile, _key_password(options, keyfile))
    except ssl.SSLError as error:
        if error.reason == 'KEY_VALUES_MISMATCH':
            raise TLSConfigError(f'ssl_options: the private key in {keyfile} does not '
                                 f'belong to the certificate in {certfile}') from None
        if encrypted:
            # OpenSSL 3 reports a wrong password only as "PEM lib".
            raise TLSConfigError(f'ssl_options: cannot decrypt the private key in '
                                 f'{keyfile}; check ssl_options.password') from None
        raise TLSConfigError(f'ssl_options: cannot load the certificate {certfile} and '
                             f'the private key {keyfile}: {_ssl_text(error)}') from None


def _key_password(options: Mapping[str, Any],
                  keyfile: str) -> str | bytes | Callable[[], str]:
    password: str | bytes | None = options.get('password')
    if password is not None:
        return password

    # Without a callback OpenSSL would prompt on the terminal for the
    # password of an encrypted key. The callback runs only for such a key.
    def missing_password() -> str:
        raise TLSConfigError(f'ssl_options: the private key in {keyfile} is '
                             f'encrypted; set ssl_options.password')
    return missing_password


def _set_ciphers(context: ssl.SSLContext, ciphers: str) -> None:
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TLSConfigError(f'ssl_options.ciphers {ciphers!r} selects no cipher that '
                             f'{ssl.OPENSSL_VERSION} supports') from None


def _ssl_text(error: ssl.SSLError) -> str:
    """Return OpenSSL's text without the "[SSL: REASON]" prefix and "(_ssl.c:1006)"."""
    text = str(error.args[1] if len(error.args) > 1 else error)
    text = re.sub(r'^\[[A-Z0-9]+(: [A-Z0-9_]+)?\]\s*', '', text)
    return re.sub(r'\s*\(_ssl\.c:\d+\)$', '', text)


# -- explaining failed handshakes --------------------------------------------

def describe_handshake_failure(error: BaseException, host: str, port: int) -> str | None:
    """Return one line on why the TLS handshake with ``host:port`` failed.

    ``error`` is what pika reported for a failed connection. The SSL error
    is searched for among the exceptions it wraps. Returns None when the
    failure was not in the TLS handshake.
    """
    # Imported here so that configuration checks, which use check_options,
    # do not import pika.
    from pika.adapters.utils.connection_workflow import (
        AMQPConnectorStackTimeout, AMQPConnectorTransportSetupError)

    where = f'TLS handshake with {host}:{port} failed'
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f'{where}: {_explain_verification(cause, host)}'
        if isinstance(cause, ssl.SSLError):
            # OpenSSL gives no reason for a connection closed mid-handshake.
            reason = getattr(cause, 'reason', None) or ''
            if not reason and isinstance(cause, ssl.SSLEOFError):
                reason = 'UNEXPECTED_EOF_WHILE_READING'
            return f'{where}: {_explain_reason(reason, _ssl_text(cause), port)}'
        if (isinstance(cause, AMQPConnectorTransportSetupError)
                and isinstance(cause.exception, AMQPConnectorStackTimeout)):
            return (f'{where}: timed out; check that port {port} is a TLS listener '
                    f'and that nothing between drops the traffic')
    for cause in _causes(error):
        if match := SSL_REASON_IN_TEXT.search(str(cause)):
            reason = match['reason']
        elif match := SSL_EOF_IN_TEXT.search(str(cause)):
            reason = 'UNEXPECTED_EOF_WHILE_READING'
        else:
            continue
        return f'{where}: {_explain_reason(reason, match["text"].strip(), port)}'
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """Yield ``error`` and the exceptions it wraps, outermost first.

    pika wraps connection errors in several layers: ``exceptions`` (a
    failed connection workflow), ``exception`` (a failed connector phase),
    the exception's args, and the usual ``__cause__`` and ``__context__``.
    """
    pending = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped: list[Any] = [*getattr(current, 'exceptions', ()),
                              getattr(current, 'exception', None), *current.args,
                              current.__cause__, current.__context__]
        pending.extend(item for item in wrapped if isinstance(item, BaseException))


def _explain_verification(error: ssl.SSLCertVerificationError, host: str) -> str:
    code = error.verify_code
    detail = error.verify_message
    if code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH):
        return (f"the server's certificate is not valid for {host} ({detail}); set "
                f"rabbitmq.host to a name the certificate lists, or set "
                f"ssl_options.verify_hostname: false")
    if code == X509_V_ERR_CERT_HAS_EXPIRED:
        return (f"the server's certificate has expired ({detail}); the server needs a "
                f"new certificate")
    if code == X509_V_ERR_CERT_NOT_YET_VALID:
        return (f"the server's certificate is not valid yet ({detail}); check the "
                f"clocks of both hosts")
    return (f"the server's certificate cannot be verified ({detail}); set "
            f"ssl_options.ca_certs, ca_path or ca_data to the CA that signed it")


def _explain_reason(reason: str, text: str, port: int) -> str:
    if reason in NOT_TLS_REASONS:
        return (f'the server did not answer in TLS ({text}); check that port {port} '
                f'is a TLS listener (RabbitMQ uses 5671 for TLS, 5672 for plain AMQP)')
    if reason in EOF_REASONS:
        return (f'the server closed the connection ({text}); check that port {port} is '
                f'a TLS listener and, if the server requires a client certificate, '
                f'that ssl_options.certfile names one signed by a CA the server trusts')
    if reason in CERTIFICATE_REQUIRED_REASONS:
        return (f'the server requires a client certificate ({text}); set '
                f'ssl_options.certfile and keyfile')
    if reason in CLIENT_CERTIFICATE_REJECTED_REASONS:
        return (f'the server rejected the client certificate ({text}); it must be '
                f'valid and signed by a CA that the server trusts')
    if reason in PROTOCOL_VERSION_REASONS:
        return (f'the server supports none of the TLS versions allowed ({text}); '
                f'check ssl_options.protocol')
    if reason == 'SSLV3_ALERT_HANDSHAKE_FAILURE':
        return (f'the server ended the handshake ({text}); check ssl_options.ciphers, '
                f'and whether the server requires a client certificate')
    return text or reason or 'unknown SSL error'


# -- amqps:// URLs -----------------------------------------------------------

# Query parameters of an amqps:// URL, named as in RabbitMQ's "URI Query
# Parameters" guide, and the ssl_options keys they set.
URL_QUERY_OPTIONS = {'cacertfile': 'ca_certs', 'certfile': 'certfile',
                     'keyfile': 'keyfile', 'password': 'password'}


def options_from_url_query(query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Return the ssl_options that the query parameters of an amqps:// URL set.

    ``query`` is what :func:`urllib.parse.parse_qs` returns. The last value
    of a repeated parameter wins, and parameters that are not about TLS are
    ignored. Raises ValueError for ``verify=verify_none``, because mikkoo
    always verifies the server, and for ``server_name_indication``, which
    it does not support.
    """
    options = {key: query[parameter][-1] for parameter, key in URL_QUERY_OPTIONS.items()
               if parameter in query}
    verify = query.get('verify', ['verify_peer'])[-1]
    if verify != 'verify_peer':
        raise ValueError(f'verify={verify} is not supported: mikkoo always verifies the '
                         f"server's certificate; remove the parameter")
    if 'server_name_indication' in query:
        raise ValueError('server_name_indication is not supported; use the rabbitmq '
                         'section, whose ssl_options.verify_hostname turns the host name '
                         'check off')
    return options

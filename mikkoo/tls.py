"""Build the TLS context for the RabbitMQ connection from ``ssl_options``."""
from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any


class TLSConfigError(Exception):
    """Raised when ``ssl_options`` name a file or value that cannot be used."""


def client_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """Return a client SSLContext that verifies the server against the CAs given.

    Raises TLSConfigError naming the option and file at fault.
    """
    protocol = options.get('protocol', ssl.PROTOCOL_TLS_CLIENT)
    try:
        context = ssl.SSLContext(protocol)
    except (ValueError, TypeError, OSError) as error:
        raise TLSConfigError(f'ssl_options.protocol {protocol!r} is not usable: {error}') from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = bool(options.get('verify_hostname', True))

    _load_verify_locations(context, options)
    if options.get('certfile'):
        _load_cert_chain(context, options)
    if options.get('ciphers'):
        try:
            context.set_ciphers(options['ciphers'])
        except ssl.SSLError as error:
            raise TLSConfigError(
                f'ssl_options.ciphers {options["ciphers"]!r} selects no cipher: {error}') from None
    return context


def _load_verify_locations(context: ssl.SSLContext, options: Mapping[str, Any]) -> None:
    cafile = options.get('ca_certs')
    capath = options.get('ca_path')
    cadata = options.get('ca_data')
    if not (cafile or capath or cadata):
        context.load_default_certs()
        return
    try:
        context.load_verify_locations(cafile=cafile, capath=capath, cadata=cadata)
    except FileNotFoundError as error:
        raise TLSConfigError(f'ssl_options: CA file not found: {error.filename or cafile}') from None
    except OSError as error:
        raise TLSConfigError(f'ssl_options: cannot read the CA certificates: {error}') from None
    except ssl.SSLError as error:
        raise TLSConfigError(f'ssl_options: invalid CA certificates: {error}') from None


def _load_cert_chain(context: ssl.SSLContext, options: Mapping[str, Any]) -> None:
    certfile = options['certfile']
    keyfile = options.get('keyfile')
    try:
        context.load_cert_chain(certfile, keyfile, options.get('password'))
    except FileNotFoundError as error:
        raise TLSConfigError(
            f'ssl_options: certificate or key file not found: {error.filename or certfile}') from None
    except OSError as error:
        raise TLSConfigError(f'ssl_options: cannot read {certfile}: {error}') from None
    except ssl.SSLError as error:
        raise TLSConfigError(
            f'ssl_options: cannot load certificate {certfile} and key {keyfile or certfile} '
            f'(wrong key password?): {error}') from None

"""TLS contexts for the node's listener and for DICOM destinations.

DICOM over TLS (PS3.15 Annex B) is plain TLS around the usual association.  Both sides
use TLS 1.2 or newer and verify the peer against a CA; the listener can demand client
certificates (mutual TLS), which is how a site restricts who may send to the node.

pynetdicom takes the contexts as ``ae.start_server(..., ssl_context=server_context(tls))``
and ``ae.associate(..., tls_args=(client_context(tls), server_hostname))``.
"""
from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.config.settings import TLSSettings
from dicom_node.errors import UserError

__all__ = ["server_context", "client_context"]


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """Context for the listener: our certificate, and the client CA when one is configured.

    With ``require_client_cert`` a client without a certificate signed by ``tls.ca`` fails
    the handshake; without it, a client certificate is verified when one is presented.
    """
    if tls.cert is None or tls.key is None:
        raise UserError("node.tls: cert and key are required for the listener")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls.cert, tls.key)
    if tls.ca is not None:
        _load_ca(ctx, tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise UserError("node.tls: require_client_cert needs a ca to verify client certificates")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """Context for dialling a peer: verify it against ``tls.ca`` (else the system store).

    ``tls.cert``/``tls.key`` are presented when the peer asks for a client certificate.
    Hostname checking follows ``tls.check_hostname``; pass the host dialled as
    ``server_hostname`` to pynetdicom.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = bool(tls.check_hostname)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.ca is not None:
        _load_ca(ctx, tls.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert is not None or tls.key is not None:
        if tls.cert is None or tls.key is None:
            raise UserError("tls: cert and key go together")
        _load_chain(ctx, tls.cert, tls.key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except FileNotFoundError as exc:
        raise UserError(f"tls: file not found: {exc.filename or cert}") from None
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"tls: cannot load certificate {cert} / key {key}: {_reason(exc)}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise UserError(f"tls: CA file not found: {ca}") from None
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"tls: cannot load CA {ca}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc).splitlines()[0]

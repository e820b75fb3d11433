"""Client certificates on the web server: the ASGI TLS extension and who may post by certificate.

Why a protocol class of our own: uvicorn (0.55, and no release before it; its issue #745 and
PR #1119 were never merged) does not tell the application anything about the TLS connection, so
the app could not see a client certificate that the handshake verified.  :class:`TLSScopeProtocol`
is uvicorn's h11 protocol plus one step: once the handshake is done (asyncio calls
``connection_made`` after it) it reads the peer certificate from the SSL object and puts it into
every request's scope as ``scope["extensions"]["tls"]``, as the ASGI TLS extension specifies
(``client_cert_chain``, ``client_cert_name`` as an RFC 4514 string, ``client_cert_error``,
``tls_version``, ``cipher_suite``, ``server_cert``).  Nothing else of uvicorn changes; over
plain HTTP there is no ``tls`` extension, as the spec requires.

Who may post by certificate (``web.stow_rs.client_ca``, optional ``web.stow_rs.subjects``): the
web server's TLS context asks for a client certificate without requiring one
(``ssl.CERT_OPTIONAL``) and trusts only that CA for it, so a certificate from another CA fails
the handshake and one in the scope was signed by that CA (:func:`dicom_node.web.stow.client_subject`
reads it).  A browser without a certificate logs in to the console as before.  This module is
imported when the web server starts (it imports uvicorn), not by the app.
"""
from __future__ import annotations

import dataclasses
import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["TLSScopeProtocol", "tls_extension", "rfc4514", "web_context"]

# Python's attribute names (OpenSSL long names) -> the RFC 4514 short names (also OpenSSL's)
SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
               "localityName": "L", "stateOrProvinceName": "ST", "domainComponent": "DC", "userId": "UID",
               "streetAddress": "STREET"}
TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _escape(value: str) -> str:
    """An attribute value as RFC 4514 section 2.4 writes it."""
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def rfc4514(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """A subject of ``SSLSocket.getpeercert()`` as an RFC 4514 string (``CN=gw,O=Hospital``):
    the last RDN first, as ``openssl x509 -noout -subject -nameopt RFC2253`` prints it."""
    return ",".join("+".join(f"{SHORT_NAMES.get(name, name)}={_escape(value)}" for name, value in rdn)
                    for rdn in reversed(subject))


def tls_extension(transport: Any) -> dict[str, Any] | None:
    """The ASGI ``tls`` extension of a connection (None: not TLS)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    # a certificate is only here when it verified: CERT_OPTIONAL fails the handshake otherwise
    peer = ssl_object.getpeercert() if der else None
    return {
        "server_cert": None,  # Python's ssl does not give back our own certificate
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],  # Python 3.11: the leaf only
        "client_cert_name": rfc4514(peer.get("subject", ())) if peer else None,
        "client_cert_error": None,
        "tls_version": TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # Python's ssl names the cipher but does not give its IANA number
    }


class TLSScopeProtocol(H11Protocol):
    """uvicorn's h11 protocol with the ASGI TLS extension in each request's scope (see the module)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        tls = tls_extension(transport)
        if tls is None:
            return
        app = self.app

        async def with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
            await app(scope, receive, send)

        self.app = with_tls  # this connection's requests only


def web_context(web: Any) -> ssl.SSLContext:
    """The web server's TLS context (``web.tls``); with ``web.stow_rs.client_ca`` it also asks
    for a client certificate, optional, verified against that CA and no other."""
    from dicom_node.tls import server_context

    tls = web.tls
    if web.stow_rs_client_ca is not None:
        tls = dataclasses.replace(tls, ca=web.stow_rs_client_ca, require_client_cert=False)
    return server_context(tls)

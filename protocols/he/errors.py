"""Typed errors of homomorphic aggregation (all subclasses of the protocol errors)."""

from __future__ import annotations

from ..errors import DecodeError, RemoteProtocolError


class ParameterMismatchError(DecodeError):
    """A ciphertext or context does not match this run's parameters or current key.

    Raised *before* the ciphertext touches the running sum: wrong ``N``, moduli
    or plaintext modulus, wrong CKKS scale, wrong length, a three-polynomial
    (multiplied) ciphertext, or an upload labelled with another key id.
    """


class SecretKeyExposureError(RemoteProtocolError):
    """Something sent to the aggregation server carries a secret key.

    The server refuses to load it: under either key mode the server must never
    hold key material that decrypts.
    """


class BelowMinClientsError(RemoteProtocolError):
    """A decryption was requested for an aggregate of fewer than ``min_clients`` contributors.

    The decryptor (key authority or client) refuses: decrypting a sum of one
    client is decrypting that client's update.
    """

"""Cryptographic primitives, in one place (hazardous-materials layer).

Everything here takes explicit key and seed bytes and keeps no global RNG
state. Secrets come from :func:`os.urandom` / :mod:`secrets` or from
:class:`securefed.protocols.csprng.KeyStream`.

* :mod:`.kex`: X25519 key agreement + HKDF-SHA256 with domain-separated ``info``.
* :mod:`.aead`: AES-256-GCM with associated data; failures raise.
* :mod:`.shamir`: Shamir t-of-n sharing of 256-bit secrets over GF(2^256 + 297).
* :mod:`.sign`: Ed25519 signatures with domain-separated signed bytes; verify raises.
"""

"""libp2p transport adapter.

Importing this package is cheap on purpose: the modules that need py-libp2p
(`host`, `pnet`, `transport`) import it themselves, so the pure parts
(`envelope`, `framing`, `xsalsa20`, `blob`, `api`) can be used and tested without
paying ~1 s for `import libp2p`.
"""

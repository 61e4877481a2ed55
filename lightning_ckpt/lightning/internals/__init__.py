"""Every private Lightning and torch internal the adapters touch, one small function each.

This folder is the surface a Lightning or torch release can break; docs/INTERNALS.md lists each
function with the release it was checked against and the test that fails when it moves. Code
elsewhere in the package never reads a private attribute (tests/test_layout.py checks it): it calls a
function here.

It imports only Lightning, torch and ``lightning_ckpt.errors``; it must not import any other module
of ours, so a release that moves an internal breaks one file.
"""

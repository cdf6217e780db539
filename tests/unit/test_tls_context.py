"""The registry client's TLS context is made once per process per setting (oci/registry.py)."""

import ssl

from bencher_runner.oci.registry import tls_context


def test_one_context_per_setting_and_the_cert_variables_are_part_of_it() -> None:
    default = tls_context(True, None, None)
    assert tls_context(True, None, None) is default  # the CA bundle is loaded once
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    assert tls_context(True, "/etc/ssl/certs/ca-certificates.crt", None) is not default
    off = tls_context(False, None, None)
    assert off.verify_mode == ssl.CERT_NONE and off is not default

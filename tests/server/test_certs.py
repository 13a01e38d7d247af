import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.artifacts import OutputExistsError
from server import certs


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path):
    certs.create(tmp_path, ["localhost", "127.0.0.1"], nodes=2)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for i in (1, 2):  # node keys in OpenSSH format, the pair matches, the private half is owner-only
        private = load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert stat.S_IMODE((tmp_path / f"node-{i}").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_certificates_are_never_overwritten(tmp_path):
    certs.create(tmp_path, ["localhost"], nodes=1)
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(OutputExistsError):
        certs.create(tmp_path, ["localhost"], nodes=3)
    assert (tmp_path / "ca.crt").read_bytes() == before and not (tmp_path / "node-2").exists()

"""The trust store: which ARKs a chain may end in.

The five AMD ARKs are pinned by key id and by the SHA-256 of their public key (DER
SubjectPublicKeyInfo, as `AmdCert.fingerprint()` computes it). The constants were computed from
AMD's published certificates; tests/sev/test_trust.py recomputes them from the fixtures. A key id
alone proves nothing (anyone can write 16 bytes), so both must match.

A lab root is trusted only by a store made with `with_lab_root`, and it reports itself as one
(`generation="LAB"`, `is_lab=True`), so nothing can mistake a lab chain for an AMD one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sevconsole.sev.certs import AmdCert, SevCert, Usage, is_lab_key_id
from sevconsole.sev.chain import check_link
from sevconsole.sev.errors import SevFormatError

LAB_GENERATION = "LAB"


@dataclass(frozen=True)
class PinnedArk:
    generation: str  # "naples", "rome", ... or "LAB"
    key_id: bytes
    key_sha256: str  # hex, of the DER SubjectPublicKeyInfo
    is_lab: bool = False

    @property
    def name(self) -> str:
        if self.is_lab:
            return f"lab root {self.key_id[:8].decode('ascii', 'replace')}-{self.key_id[8:].hex()}"
        return f"AMD {self.generation.capitalize()} ARK"


@dataclass(frozen=True)
class RootInfo:
    """The root a chain ends in."""

    name: str  # "AMD Rome ARK", "lab root LAB-ROOT-..."
    generation: str  # "naples" ... "turin", or "LAB"
    is_lab: bool
    key_id: str  # hex
    key_sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "generation": self.generation, "is_lab": self.is_lab,
                "key_id": self.key_id, "key_sha256": self.key_sha256}


AMD_ARKS: tuple[PinnedArk, ...] = (
    PinnedArk("naples", bytes.fromhex("1bb987c359494606b174945601c9ea5b"),
              "3a04f8f1347de206c9206a81148ba4ef0a233b245d43a15dd82de043bb3e4f69"),
    PinnedArk("rome", bytes.fromhex("e6002122fb58419399d15fee7b131351"),
              "7447ffa21e2b938bfade89f5e9066c00a328813bfc43685605cceabd18da6fde"),
    PinnedArk("milan", bytes.fromhex("94c38e4177d0479292a7ae671d083fb6"),
              "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9"),
    PinnedArk("genoa", bytes.fromhex("9f9d4a8fe761456599f6946c4c010f3a"),
              "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831"),
    PinnedArk("turin", bytes.fromhex("d05c3a8bde484904b49552422ceb3942"),
              "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08"),
)


@dataclass(frozen=True)
class TrustStore:
    pins: tuple[PinnedArk, ...]

    @classmethod
    def amd(cls) -> TrustStore:
        """The five AMD ARKs, Naples to Turin. Never trusts a lab root."""
        return cls(AMD_ARKS)

    def with_lab_root(self, ark: AmdCert) -> TrustStore:
        """This store plus a lab ARK, pinned as generation "LAB" (`TrustStore.amd().with_lab_root(ark)`).

        Only an ARK whose key id starts with b"LAB-ROOT" may be added this way, so a real AMD
        key can never be relabelled as the lab's.
        """
        if not is_lab_key_id(ark.key_id) or ark.key_usage != Usage.ARK:
            raise ValueError(f"{ark.name} is not a lab root ARK (its key id must start with LAB-ROOT "
                             f"and its usage must be ARK)")
        try:
            digest = ark.fingerprint()
        except SevFormatError as exc:
            raise ValueError(f"{ark.name} holds no usable RSA key: {exc.message}") from None
        return TrustStore((*self.pins, PinnedArk(LAB_GENERATION, ark.key_id, digest, True)))

    @property
    def has_lab_root(self) -> bool:
        return any(pin.is_lab for pin in self.pins)

    def pin_for_key_id(self, key_id: bytes) -> PinnedArk | None:
        return next((pin for pin in self.pins if pin.key_id == key_id), None)

    def root_for(self, ark: AmdCert) -> tuple[RootInfo | None, str]:
        """(the trusted root, a sentence why) or (None, a sentence why not)."""
        pin = self.pin_for_key_id(ark.key_id)
        if pin is None:
            if is_lab_key_id(ark.key_id):
                return None, (f"{ark.name} is a lab root (key id {ark.key_id.hex()}), trusted only when "
                              f"the lab root is given explicitly")
            known = ", ".join(p.generation for p in self.pins)
            return None, (f"{ark.name} (key id {ark.key_id.hex()}) is not one of the pinned ARKs ({known})")
        try:
            digest = ark.fingerprint()
        except SevFormatError:
            digest = ""
        if digest != pin.key_sha256:
            return None, (f"{ark.name} has the key id of the pinned {pin.name} but a different public key "
                          f"(sha256 {digest or 'unreadable'}, pinned {pin.key_sha256}): it is not that root")
        info = RootInfo(pin.name, pin.generation, pin.is_lab, pin.key_id.hex(), pin.key_sha256)
        return info, f"{ark.name} is the pinned {pin.name} (key sha256 {pin.key_sha256[:16]}...)"

    def generation_of(self, cek: SevCert, asks: Iterable[AmdCert]) -> str | None:
        """The generation whose ASK signed this CEK (tried one by one), or None.

        The ASK must also name a pinned ARK as its certifier; the ARK itself is checked by
        `verify_chain`.
        """
        found = self.ask_for(cek, asks)
        if found is None:
            return None
        pin = self.pin_for_key_id(found.certifying_id)
        return pin.generation if pin else None

    def ask_for(self, cek: SevCert, asks: Iterable[AmdCert]) -> AmdCert | None:
        """The first ASK that signed `cek` and is certified by a pinned ARK's key id."""
        for ask in asks:
            if self.pin_for_key_id(ask.certifying_id) and check_link(ask, cek).ok:
                return ask
        return None

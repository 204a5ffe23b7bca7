"""Migration parameters and capabilities, accepted and refused as QEMU 7.2 does.

`SET_PARAMETERS` is MigrateSetParameters in schema order (the QAPI visitor's order decides which
bad member is named first), then the SEV migration series' `sev-pdh`, `sev-plat-cert` and
`sev-amd-cert`. `check_parameters` is migrate_params_check(): the merged values are checked in
QEMU's order with its sentences, which name the C fields (`downtime_limit`, not the QMP name).
`check_capabilities` is migrate_caps_check() for the combinations QEMU refuses.

The lab's stream has one channel and no compression: parameters and capabilities that shape
QEMU's wire format are kept and reported but change nothing here (docs/internals.md).
"""

from __future__ import annotations

import copy
from typing import Any

from .qapi import Bool, Enum, List, Member, QapiError, Str, StrOrNull, Struct, Uint, struct

PAGE_SIZE = 4096
MAX_DOWNTIME_MS = 2000 * 1000  # QEMU's MAX_MIGRATE_DOWNTIME, printed as its macro text

DEFAULT_PARAMS: dict[str, Any] = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "compress-level": 1, "compress-threads": 8, "compress-wait-thread": True, "decompress-threads": 2,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
    "max-bandwidth": 134217728, "downtime-limit": 300, "x-checkpoint-delay": 20000,
    "block-incremental": False, "multifd-channels": 2, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "max-cpu-throttle": 99, "multifd-compression": "none",
    "multifd-zlib-level": 1, "multifd-zstd-level": 1,
    # the SEV migration series (never merged upstream): the target's PDH and chains, base64
    "sev-pdh": "", "sev-plat-cert": "", "sev-amd-cert": "",
}
SEV_PARAMS = ("sev-pdh", "sev-plat-cert", "sev-amd-cert")

U8, U32, U64 = Uint(8), Uint(32), Uint()
_BITMAP_ALIAS = struct(("name", Str(), False), ("alias", Str(), False),
                       ("transform", struct(("persistent", Bool()))))
_NODE_ALIAS = struct(("node-name", Str(), False), ("alias", Str(), False),
                     ("bitmaps", List(_BITMAP_ALIAS), False))
SET_PARAMETERS = Struct(tuple(Member(name, type_) for name, type_ in (
    ("announce-initial", U64), ("announce-max", U64), ("announce-rounds", U64), ("announce-step", U64),
    ("compress-level", U8), ("compress-threads", U8), ("compress-wait-thread", Bool()),
    ("decompress-threads", U8), ("throttle-trigger-threshold", U8), ("cpu-throttle-initial", U8),
    ("cpu-throttle-increment", U8), ("cpu-throttle-tailslow", Bool()), ("tls-creds", StrOrNull()),
    ("tls-hostname", StrOrNull()), ("tls-authz", StrOrNull()), ("max-bandwidth", U64),
    ("downtime-limit", U64), ("x-checkpoint-delay", U32), ("block-incremental", Bool()),
    ("multifd-channels", U8), ("xbzrle-cache-size", U64), ("max-postcopy-bandwidth", U64),
    ("max-cpu-throttle", U8), ("multifd-compression", Enum(("none", "zlib", "zstd"))),
    ("multifd-zlib-level", U8), ("multifd-zstd-level", U8),
    ("block-bitmap-mapping", List(_NODE_ALIAS)),
    ("sev-pdh", Str()), ("sev-plat-cert", Str()), ("sev-amd-cert", Str()),
)))

# QEMU 7.2's MigrationCapability, in its order.
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram",
    "x-colo", "release-ram", "block", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt",
)
SET_CAPABILITIES = struct(("capabilities", List(struct(
    ("capability", Enum(CAPABILITIES), False), ("state", Bool(), False))), False))
# What `migrate` cannot do in the lab though QEMU accepts the capability: it would change the
# migration's course (a pause the client resumes, a snapshot instead of a move, COLO checkpoints).
UNMODELLED_AT_MIGRATE = ("pause-before-switchover", "background-snapshot", "x-colo")
BACKGROUND_INCOMPATIBLE = ("postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
                           "return-path", "multifd", "pause-before-switchover", "auto-converge",
                           "release-ram", "rdma-pin-all", "compress", "xbzrle", "x-colo", "validate-uuid",
                           "zero-copy-send")
ZERO_COPY = "Zero copy only available for non-compressed non-TLS multifd migration"


def _range(field: str, what: str) -> QapiError:
    return QapiError(f"Parameter '{field}' expects {what}")


def apply_parameters(current: dict[str, Any], new: dict[str, Any], caps: dict[str, bool]) -> dict[str, Any]:
    """The parameters after `new` (already visited), or QapiError with QEMU's sentence."""
    merged = copy.deepcopy(current)
    for key, value in new.items():
        merged[key] = "" if value is None else value  # StrOrNull: null means "" (tls-*)
    check_parameters(merged, new, caps)
    return merged


def check_parameters(p: dict[str, Any], new: dict[str, Any], caps: dict[str, bool]) -> None:
    """migrate_params_check(), in its order."""
    if p["compress-level"] > 9:
        raise _range("compress_level", "a value between 0 and 9")
    for key in ("compress-threads", "decompress-threads"):
        if p[key] < 1:
            raise _range(key.replace("-", "_"), "a value between 1 and 255")
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise _range("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    for key in ("cpu-throttle-initial", "cpu-throttle-increment"):
        if not 1 <= p[key] <= 99:
            raise _range(key.replace("-", "_"), "an integer in the range of 1 to 99")
    if p["downtime-limit"] > MAX_DOWNTIME_MS:
        raise _range("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if p["multifd-channels"] < 1:
        raise _range("multifd_channels", "a value between 1 and 255")
    size = p["xbzrle-cache-size"]
    if size < PAGE_SIZE or size & (size - 1):
        raise _range("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise _range("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    for key, top in (("announce-initial", 100000), ("announce-max", 100000), ("announce-rounds", 1000)):
        if p[key] > top:
            raise _range(key.replace("-", "_"), f"a value between 0 and {top}")
    if not 1 <= p["announce-step"] <= 10000:
        raise _range("announce_step", "a value between 0 and 10000")
    if "block-bitmap-mapping" in new:
        check_bitmap_mapping(new["block-bitmap-mapping"])
    if caps.get("zero-copy-send") and (p["multifd-compression"] != "none" or p["tls-creds"]):
        raise QapiError(ZERO_COPY)


def check_bitmap_mapping(mapping: list[dict[str, Any]]) -> None:
    """check_dirty_bitmap_mig_alias_map(): lengths and duplicates (the lab has no block nodes to
    look up, like a QEMU without disks)."""
    def bad(why: str) -> QapiError:
        return QapiError(f"Invalid mapping given for block-bitmap-mapping: {why}")

    nodes: set[str] = set()
    node_aliases: set[str] = set()
    for node in mapping:
        name, alias = node["node-name"], node["alias"]
        if len(alias.encode()) > 255:
            raise bad(f"The node alias '{alias}' is longer than 255 bytes")
        if name in nodes:
            raise bad(f"The node name '{name}' is mapped twice")
        if alias in node_aliases:
            raise bad(f"The node alias '{alias}' is used twice")
        nodes.add(name)
        node_aliases.add(alias)
        names: set[str] = set()
        aliases: set[str] = set()
        for bitmap in node["bitmaps"]:
            if len(bitmap["alias"].encode()) > 255:
                raise bad(f"The bitmap alias '{name}'/'{bitmap['alias']}' is longer than 255 bytes")
            if bitmap["name"] in names:
                raise bad(f"The bitmap '{name}'/'{bitmap['name']}' is mapped twice")
            if bitmap["alias"] in aliases:
                raise bad(f"The bitmap alias '{alias}'/'{bitmap['alias']}' is used twice")
            names.add(bitmap["name"])
            aliases.add(bitmap["alias"])


def query_parameters(p: dict[str, Any]) -> dict[str, Any]:
    """query-migrate-parameters: block-bitmap-mapping shows once it was set, as in QEMU."""
    return copy.deepcopy(p)


def apply_capabilities(current: dict[str, bool], wanted: list[dict[str, Any]],
                       params: dict[str, Any]) -> dict[str, bool]:
    caps = dict(current)
    for item in wanted:
        caps[item["capability"]] = item["state"]
    check_capabilities(caps, params)
    return caps


def check_capabilities(caps: dict[str, bool], params: dict[str, Any]) -> None:
    """migrate_caps_check(): the combinations QEMU 7.2 refuses, in its order."""
    on = {name for name, state in caps.items() if state}
    if "postcopy-ram" in on and "x-ignore-shared" in on:
        raise QapiError("Postcopy is not compatible with ignore-shared")
    if "background-snapshot" in on:
        for name in BACKGROUND_INCOMPATIBLE:
            if name in on:
                raise QapiError(f"Background-snapshot is not compatible with {name}")
    if "zero-copy-send" in on and ("multifd" not in on or "compress" in on or "xbzrle" in on
                                   or params["multifd-compression"] != "none" or params["tls-creds"]):
        raise QapiError(ZERO_COPY)
    if "postcopy-preempt" in on:
        if "postcopy-ram" not in on:
            raise QapiError("Postcopy preempt requires postcopy-ram")
        if "compress" in on:
            raise QapiError("Postcopy preempt not compatible with compress")
    if "multifd" in on and "compress" in on:
        raise QapiError("Multifd is not compatible with compress")


def query_capabilities(caps: dict[str, bool]) -> list[dict[str, Any]]:
    return [{"capability": name, "state": bool(caps.get(name, False))} for name in CAPABILITIES]

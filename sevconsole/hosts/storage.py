"""Which disk images each host sees under its shared storage (the inventory's `shared_storage`).

After a discovery of several hosts, each host that declares shared storage is asked (one helper
`files` call) about the images the other hosts' VMs name under its folders, so preflight can say,
per file, whether a target would find it ("storage not shared") before anything starts. The
answers land in `HostReport.storage_files` as {path: "present" | why not}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from sevconsole.hosts.diskpaths import disk_paths, under_storage
from sevconsole.hosts.errors import HostError
from sevconsole.hosts.inventory import HostSpec
from sevconsole.hosts.remote import file_states
from sevconsole.hosts.report import HostReport
from sevconsole.hosts.ssh import SshConnection

MAX_FILES = 256  # one helper call's worth


def seen_disks(reports: list[HostReport], specs: Sequence[HostSpec],
               connect: Callable[[HostSpec], SshConnection]) -> list[HostReport]:
    by_name = {s.name: s for s in specs}
    out = []
    for report in reports:
        spec = by_name.get(report.name)
        folders = spec.shared_storage if spec is not None else ()
        wanted = sorted({path for other in reports if other.name != report.name for vm in other.vms
                         for path in disk_paths(vm.argv) if under_storage(path, folders)})[:MAX_FILES]
        if not wanted or not report.reachable or report.host_key is not None or report.lab or spec is None:
            out.append(report)
            continue
        try:
            files = file_states(connect(spec), wanted, folders)
        except HostError as exc:
            out.append(replace(report, errors=(*report.errors, f"{report.name}: its shared storage could not be "
                                                          f"looked at: {exc}")))
            continue
        out.append(replace(report, storage_files=files))
    return out

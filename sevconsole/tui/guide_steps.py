"""The guided tour's script: what each step says and does. Plain data, so it reads as a lesson."""

from __future__ import annotations

from dataclasses import dataclass, field

from sevconsole.engine.progress import Phase


@dataclass(frozen=True)
class Step:
    title: str
    text: str
    action: str = "read"  # read | preflight | migrate
    vm: str = ""
    source: str = ""
    target: str = ""
    lab_commands: tuple[tuple[str, dict[str, object]], ...] = ()  # QMP to the source VM first
    cancel_if_not_converging: bool = False
    bandwidth_bps: int | None = None  # slowed down so each phase can be read as it happens
    expect: str = ""  # what the operator should see: the step's point in one line
    notes: dict[Phase, str] = field(default_factory=dict)


PHASE_NOTES = {
    Phase.CONNECTING: "The console starts the incoming VM on the target (same configuration, "
                      "-incoming defer) and opens QMP to both ends over SSH.",
    Phase.SEND_START: "SEND_START: the source firmware does ECDH between its own PDH private key "
                      "and the target's PDH, derives the master secret (KDF with a fresh nonce), "
                      "then KEK and KIK, and wraps a fresh TEK/TIK into the 128-byte session. "
                      "Guest state RUNNING -> SUPDATE. The target's RECEIVE_START does the same ECDH "
                      "from its side and checks wrap_mac, then policy_mac: UNINIT -> RUPDATE.",
    Phase.PRECOPY: "Pre-copy: private pages leave as SEV packets (AES-128-CTR under the TEK, "
                   "HMAC-SHA256 under the TIK; the target checks the MAC before decrypting). "
                   "Shared pages (the guest gave them to the host: DMA buffers, virtio rings) "
                   "travel in clear: the hypervisor can read them anyway. Red and yellow cells "
                   "are pages the guest wrote after they were sent: the next pass resends them.",
    Phase.STOP_AND_COPY: "The dirty set is small enough to send within the downtime limit: the "
                         "source pauses the guest and sends the rest.",
    Phase.FINISHING: "SEND_FINISH: the source guest becomes SENT. Only DECOMMISSION is left for "
                     "it, so the firmware itself prevents a second runnable copy (no cloning). "
                     "RECEIVE_FINISH: the target guest becomes RUNNING.",
    Phase.CANCELLED: "SEND_CANCEL: the source guest is RUNNING again (SUPDATE -> RUNNING) and the "
                     "incoming VM on the target is stopped: never zero runnable copies.",
    Phase.FAILED: "The migration failed: the source guest keeps running and the target's incoming "
                  "VM is gone. The event log says which end refused and why.",
}


STEPS: tuple[Step, ...] = (
    Step("1. The lab",
         "Three simulated SEV hosts run on this machine, reached over real SSH and QMP like any host. "
         "Each has its own firmware model with a platform chain (PDH <- PEK <- CEK, OCA) signed by "
         "the lab's own AMD-style root, which the console trusts for lab hosts only. lab-1 and lab-2 "
         "share an owner (same OCA); lab-3 belongs to another owner and runs older firmware."),
    Step("2. The PDH exchange",
         "Before any page moves, the target hands the source its PDH certificate (an ECDH P-384 "
         "public key) and the chain that proves it is a genuine AMD platform. The console verifies "
         "that chain itself. The guest's policy decides what the source firmware checks on its own: "
         "DOMAIN (same owner) and SEV (chain up to AMD's root). Next: the preflight for web -> lab-2.",
         action="preflight", vm="web", source="lab-1", target="lab-2"),
    Step("3. A migration, step by step",
         "web moves from lab-1 to lab-2, slowed to 8 MB/s so each phase can be read, while its "
         "workload dirties 60 pages/s. Watch the page map fill, the transfer panel predict the "
         "downtime, and the firmware panel walk both state machines.",
         action="migrate", vm="web", source="lab-1", target="lab-2",
         lab_commands=(("x-lab-set", {"dirty-rate": 60}),), bandwidth_bps=8_000_000,
         expect="web ends RUNNING on lab-2 and SENT on lab-1: exactly one runnable copy."),
    Step("4. Refused: a NOSEND guest",
         "vault's policy sets NOSEND (bit 3). The firmware would answer SEND_START with "
         "POLICY_FAILURE; the console refuses before starting anything.",
         action="preflight", vm="vault", source="lab-1", target="lab-2"),
    Step("5. Refused: a target of another owner",
         "db on lab-2 has DOMAIN set. lab-3's OCA is not lab-2's, so its PEK is not certified by "
         "the same owner: the firmware would refuse, and the console says why.",
         action="preflight", vm="db", source="lab-2", target="lab-3"),
    Step("6. Refused: the guest never said yes",
         "legacy on lab-1 is an SEV guest whose own firmware and kernel never enabled migration. "
         "With the SEV migration series a guest must consent: it writes the KVM migration control "
         "MSR (its dmesg then says \"live migration enabled in EFI\"). Until it does, QEMU keeps its "
         "blocker, \"SEV: Migration is not implemented\", and lists it in query-migrate. Forced "
         "through anyway, the target would only reboot the guest from its firmware: the operator "
         "would see a fresh boot, not the running guest. The console reads QEMU's blocker and refuses "
         "before anything starts; the fix is in the guest (newer OVMF and kernel, one reboot).",
         action="preflight", vm="legacy", source="lab-1", target="lab-2",
         expect="refused: legacy's guest never enabled migration, so QEMU blocks it."),
    Step("7. Failure: a tampered packet",
         "The lab flips one byte of an SEV packet on the wire (x-lab-inject-fault). The target "
         "checks the packet's MAC before it decrypts: BAD_MEASUREMENT, nothing is written, the "
         "migration fails and the source guest keeps running.",
         action="migrate", vm="db", source="lab-2", target="lab-1",
         lab_commands=(("x-lab-inject-fault", {"fault": "tamper-packet", "after-pages": 64}),),
         expect="failed with BAD_MEASUREMENT on the target; db still runs on lab-2."),
    Step("8. A PSP that cannot keep up",
         "lab-4 models the real PSP: one command at a time, about 2.5 ms a page (350-450 pages/s, "
         "as AMD measured). Its guest dirties 400 pages/s: each pass leaves as much to resend as it "
         "sent, so the last copy can never fit 300 ms. The console shows the prediction and lets "
         "the operator decide; here the guide cancels once the prediction is clear.",
         action="migrate", vm="db-4", source="lab-4", target="lab-2",
         lab_commands=(("x-lab-set", {"dirty-rate": 400}),), cancel_if_not_converging=True,
         expect="NOT converging, then cancelled: db-4 runs on lab-4 again."),
    Step("End of the tour",
         "Press Esc to go back to the hosts and try it yourself: m on a host migrates one of its "
         "VMs, ? lists every key, Ctrl+P finds every action."),
)

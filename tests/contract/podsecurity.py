"""A checker for the Kubernetes Pod Security Standards, "restricted" profile (v1.30+ rules).

https://kubernetes.io/docs/concepts/security/pod-security-standards/ — baseline plus restricted:

baseline: no hostNetwork/hostPID/hostIPC; no privileged containers; capabilities added only from
the baseline list; no hostPath volumes; no hostPort; AppArmor/SELinux/procMount/sysctls not
loosened (checked: seLinuxOptions type/user/role, procMount Default, only safe sysctls).
restricted: volumes only configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim,
projected, secret; allowPrivilegeEscalation false; runAsNonRoot true (pod or every container) and
runAsUser not 0; seccompProfile RuntimeDefault or Localhost (pod or every container), never
Unconfined; capabilities drop ALL, add only NET_BIND_SERVICE.
"""
from __future__ import annotations

from typing import Any

ALLOWED_VOLUME_KEYS = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Pod, Job, Deployment, StatefulSet, DaemonSet or CronJob."""
    kind = obj.get("kind")
    if kind == "Pod":
        return obj["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way `pod` (a PodSpec) breaks the restricted profile; [] when it passes."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            out.append(f"{host} is true")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUME_KEYS:
            out.append(f"volume {vol['name']}: type {sorted(kinds - ALLOWED_VOLUME_KEYS)} not allowed")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {s.get('name')} not allowed")

    def selinux(sc: dict[str, Any], where: str) -> None:
        opts = sc.get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES or opts.get("user") or opts.get("role"):
            out.append(f"{where}: seLinuxOptions {opts}")

    def seccomp_ok(sc: dict[str, Any]) -> bool | None:
        t = (sc.get("seccompProfile") or {}).get("type")
        if t is None:
            return None
        return t in ("RuntimeDefault", "Localhost")

    selinux(psc, "pod")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    if seccomp_ok(psc) is False:
        out.append("pod: seccompProfile Unconfined")
    containers = [("container", c) for c in pod.get("containers") or []]
    containers += [("initContainer", c) for c in pod.get("initContainers") or []]
    containers += [("ephemeralContainer", c) for c in pod.get("ephemeralContainers") or []]
    for what, c in containers:
        where = f"{what} {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        ok = seccomp_ok(sc)
        if ok is False or (ok is None and not seccomp_ok(psc)):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities must drop ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            out.append(f"{where}: capabilities add {sorted(extra)}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        selinux(sc, where)
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{where}: hostPort {p['hostPort']}")
    return out

"""The test node's configuration: addresses, fixed paths, and the files its components read.

Only what node.py writes for containerd, the CNI plugins, the kubelet, kube-proxy and CoreDNS, and the
objects it creates before the controllers start. node.py does the work (start, wait, stop); this file says
what the node is. Standard library only.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

BRIDGE = "llm2llm0"
NODE_IP = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
NODE_NAME = "llm2llm-node"
CNI_NETWORK = "llm2llm"
# One node per machine: where `down` finds it, and the containerd socket (short: unix paths <= 107 bytes).
STATE_DIR = Path("/run/llm2llm-node")
STATE_FILE = STATE_DIR / "node.json"
CONTAINERD_STATE = STATE_DIR / "containerd"
CONTAINERD_SOCK = STATE_DIR / "containerd.sock"
# Images survive a `down` (importing the 8 GB job image takes minutes); so does the shared folder's data.
CACHE = Path(os.environ.get("LLM2LLM_NODE_CACHE") or
             Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm2llm" / "node")
CONTAINERD_ROOT = CACHE / "containerd"
# The volume the operator and the Ray pods share (hostPath), mounted at /shared in both.
SHARED_DIR = Path(os.environ.get("LLM2LLM_NODE_SHARED") or "/var/lib/llm2llm-node/shared")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"  # the name the kubelet expects; built from pause/ here


def write_configs(conf: Path, pki: Path, workdir: Path, dns_health: int, dns_ready: int) -> None:
    """Writes every component's config file into ``conf`` (their paths in argv mark the node's processes)."""
    c = conf
    cni = c / "cni"
    cni.mkdir(exist_ok=True)
    # No masquerading: pod traffic keeps its source and, with the REJECT rule, stays on the bridge.
    # firewall: dockerd sets FORWARD's policy to DROP; this plugin accepts the pods' own traffic.
    (cni / "10-llm2llm.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": CNI_NETWORK, "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall"},
        ]}, indent=2))
    (c / "containerd.toml").write_text(textwrap.dedent(f"""\
        version = 2
        root = "{CONTAINERD_ROOT}"
        state = "{CONTAINERD_STATE}"
        [grpc]
          address = "{CONTAINERD_SOCK}"
        [plugins."io.containerd.grpc.v1.cri"]
          # The VM withholds CAP_SYS_RESOURCE: a sandbox's oom_score_adj of -998 cannot be set.
          restrict_oom_score_adj = true
          sandbox_image = "{PAUSE_IMAGE}"
          disable_tcp_service = true
          stream_server_address = "127.0.0.1"
          stream_server_port = "0"
          tolerate_missing_hugetlb_controller = true
          disable_hugetlb_controller = true
          [plugins."io.containerd.grpc.v1.cri".cni]
            bin_dir = "/usr/lib/cni"
            conf_dir = "{cni}"
            max_conf_num = 1
          [plugins."io.containerd.grpc.v1.cri".containerd]
            snapshotter = "overlayfs"
            default_runtime_name = "runc"
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
              runtime_type = "io.containerd.runc.v2"
        """))
    # Pods resolve through the cluster DNS only; the host's resolvers are never handed to them.
    (c / "pod-resolv.conf").write_text(f"nameserver {DNS_IP}\n")
    (c / "kubelet.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kubelet.config.k8s.io/v1beta1
        kind: KubeletConfiguration
        address: {NODE_IP}
        port: 10250
        readOnlyPort: 0
        healthzBindAddress: 127.0.0.1
        healthzPort: 10248
        # This VM runs cgroup v1 with no systemd cgroup manager; swap may be on.
        cgroupDriver: cgroupfs
        failCgroupV1: false
        failSwapOn: false
        containerRuntimeEndpoint: unix://{CONTAINERD_SOCK}
        authentication:
          anonymous: {{enabled: false}}
          webhook: {{enabled: true}}
          x509: {{clientCAFile: {pki / 'ca.crt'}}}
        authorization: {{mode: Webhook}}
        clusterDomain: cluster.local
        clusterDNS: [{DNS_IP}]
        resolvConf: {c / 'pod-resolv.conf'}
        podLogsDir: {workdir / 'pod-logs'}
        serializeImagePulls: false
        # Images are imported, never pulled: never garbage-collect them. Evict only when the disk is
        # really full: importing the 8 GB job image briefly takes tens of GB, and a pressure taint would
        # then keep every pod Pending for the default 5 minutes.
        imageGCHighThresholdPercent: 100
        imageGCLowThresholdPercent: 99
        evictionHard: {{memory.available: "200Mi", nodefs.available: "1Gi", imagefs.available: "1Gi"}}
        evictionPressureTransitionPeriod: 10s
        rotateCertificates: false
        serverTLSBootstrap: false
        """))
    (c / "kube-proxy.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        clientConnection: {{kubeconfig: {c / 'proxy.kubeconfig'}}}
        mode: iptables
        clusterCIDR: {POD_CIDR}
        hostnameOverride: {NODE_NAME}
        bindAddress: {NODE_IP}
        healthzBindAddress: 127.0.0.1:10256
        metricsBindAddress: 127.0.0.1:10249
        nodePortAddresses: ["{NODE_IP}/32"]
        conntrack: {{maxPerCore: 0}}
        """))
    # Cluster DNS only: no `forward` plugin, so no query ever leaves the machine.
    (c / "Corefile").write_text(textwrap.dedent(f"""\
        .:53 {{
            bind {NODE_IP}
            errors
            health 127.0.0.1:{dns_health}
            ready 127.0.0.1:{dns_ready}
            kubernetes cluster.local in-addr.arpa ip6.arpa {{
                kubeconfig {c / 'coredns.kubeconfig'} llm2llm-node
                pods insecure
                fallthrough in-addr.arpa ip6.arpa
            }}
            cache 30
            loop
            loadbalance
        }}
        """))


def bootstrap_manifest() -> str:
    """RBAC for CoreDNS and KubeRay, and the kube-dns Service in front of the host's CoreDNS."""
    return textwrap.dedent(f"""\
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRole
        metadata: {{name: "llm2llm-node:coredns"}}
        rules:
        - apiGroups: [""]
          resources: [endpoints, services, pods, namespaces]
          verbs: [list, watch]
        - apiGroups: [discovery.k8s.io]
          resources: [endpointslices]
          verbs: [list, watch]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRoleBinding
        metadata: {{name: "llm2llm-node:coredns"}}
        roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "llm2llm-node:coredns"}}
        subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: "llm2llm-node:coredns"}}]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRoleBinding
        metadata: {{name: "llm2llm-node:kuberay-operator"}}
        roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kuberay-operator}}
        subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: "llm2llm-node:kuberay-operator"}}]
        ---
        # CoreDNS is a host process on the bridge address; this Service gives it the cluster DNS IP.
        apiVersion: v1
        kind: Service
        metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
        spec:
          clusterIP: {DNS_IP}
          ports:
          - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
          - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: kube-dns-host
          namespace: kube-system
          labels: {{kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: llm2llm-node}}
        addressType: IPv4
        endpoints:
        - addresses: ["{NODE_IP}"]
          conditions: {{ready: true}}
        ports:
        - {{name: dns, port: 53, protocol: UDP}}
        - {{name: dns-tcp, port: 53, protocol: TCP}}
    """)

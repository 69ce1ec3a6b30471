#!/usr/bin/env python3
"""Writes examples/data/sample-app.json: a `kubectl get -o json` style List of a small cluster.

The objects follow what the API server returns (server-set metadata, managedFields, status,
allocated clusterIPs and nodePorts, PVC binding annotations, controller-owned pods). Helm
release records are encoded the way Helm's secret driver encodes them (JSON, gzip, base64,
and base64 again as Secret data), by Python's own gzip so the Rust decoder is checked against
an independent encoder.

Contents, namespace `shop`:
  - Helm release `db` (a PostgreSQL chart): revision 1 superseded, 2 deployed, 3 a failed
    upgrade; StatefulSet with two replicas and a `data` claim template, Services (one
    headless), Secret, ConfigMap, ServiceAccount, pods, PVCs, endpoints.
  - A web app and a worker sharing `app.kubernetes.io/part-of=shop`: Deployment, ReplicaSet,
    pods, NodePort Service, ConfigMap, TLS Secret, RWX uploads PVC, a completed Job.
  - An operator instance: RedisCluster `sessions` (cache.example.com) owning a StatefulSet,
    a Service and a Secret; the operator runs in namespace `operators` with RBAC and a
    validating webhook.
  - Noise: events, the node, kube-root-ca.crt, a generated service-account token.
Run from the repository root: python3 discovery/tests/data/generate.py
"""
import base64, gzip, json, uuid

NS = "shop"
T0 = "2026-11-20T09:14:03Z"
objects = []
rv = [41000]


def uid(*parts):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


def meta(kind, name, ns=NS, labels=None, annotations=None, owners=None, generation=None, manager="kubectl-client-side-apply", t=T0):
    rv[0] += 17
    m = {"name": name}
    if ns:
        m["namespace"] = ns
    m["uid"] = uid(kind, ns or "", name)
    m["resourceVersion"] = str(rv[0])
    if generation is not None:
        m["generation"] = generation
    m["creationTimestamp"] = t
    if labels:
        m["labels"] = labels
    if annotations:
        m["annotations"] = annotations
    if owners:
        m["ownerReferences"] = owners
    m["managedFields"] = [{"manager": manager, "operation": "Update", "apiVersion": "v1", "time": t,
                           "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
    return m


def owner(api_version, kind, name, ns=NS, controller=True):
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid(kind, ns, name),
            "controller": controller, "blockOwnerDeletion": True}


def add(api_version, kind, metadata, **rest):
    o = {"apiVersion": api_version, "kind": kind, "metadata": metadata}
    o.update(rest)
    objects.append(o)
    return o


def helm_labels(release, name, component="primary"):
    return {"app.kubernetes.io/instance": release, "app.kubernetes.io/managed-by": "Helm",
            "app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "helm.sh/chart": "postgresql-16.2.1"}


def helm_annotations(release):
    return {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": NS}


# ---------------------------------------------------------------- cluster-scoped
for ns in [NS, "operators", "default", "kube-system"]:
    add("v1", "Namespace", meta("Namespace", ns, ns=None, labels={"kubernetes.io/metadata.name": ns}),
        spec={"finalizers": ["kubernetes"]}, status={"phase": "Active"})
add("v1", "Node", meta("Node", "node-1", ns=None, labels={"kubernetes.io/hostname": "node-1"}),
    spec={"podCIDR": "10.244.0.0/24"}, status={"nodeInfo": {"kubeletVersion": "v1.33.1"}})
add("storage.k8s.io/v1", "StorageClass",
    meta("StorageClass", "standard", ns=None, annotations={"storageclass.kubernetes.io/is-default-class": "true"}),
    provisioner="rbd.csi.ceph.com", reclaimPolicy="Delete", volumeBindingMode="WaitForFirstConsumer",
    allowVolumeExpansion=True, parameters={"clusterID": "ceph", "pool": "kube"})
add("storage.k8s.io/v1", "StorageClass", meta("StorageClass", "nfs", ns=None),
    provisioner="nfs.csi.k8s.io", reclaimPolicy="Retain", volumeBindingMode="Immediate")


def pvc(name, size, sc, access, labels=None, mode=None, annotations=None):
    pv_name = "pvc-" + uid("PersistentVolumeClaim", NS, name)
    ann = {"pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes",
           "volume.beta.kubernetes.io/storage-provisioner": "rbd.csi.ceph.com" if sc == "standard" else "nfs.csi.k8s.io",
           "volume.kubernetes.io/storage-provisioner": "rbd.csi.ceph.com" if sc == "standard" else "nfs.csi.k8s.io",
           "volume.kubernetes.io/selected-node": "node-1"}
    ann.update(annotations or {})
    spec = {"accessModes": [access], "resources": {"requests": {"storage": size}},
            "storageClassName": sc, "volumeMode": mode or "Filesystem", "volumeName": pv_name}
    add("v1", "PersistentVolumeClaim", meta("PersistentVolumeClaim", name, labels=labels, annotations=ann,
                                            manager="kube-controller-manager"),
        spec=spec, status={"phase": "Bound", "accessModes": [access], "capacity": {"storage": size}})
    add("v1", "PersistentVolume", meta("PersistentVolume", pv_name, ns=None,
                                       annotations={"pv.kubernetes.io/provisioned-by": spec["storageClassName"]}),
        spec={"accessModes": [access], "capacity": {"storage": size}, "persistentVolumeReclaimPolicy": "Delete",
              "storageClassName": sc, "volumeMode": spec["volumeMode"],
              "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": NS, "name": name,
                           "uid": uid("PersistentVolumeClaim", NS, name), "resourceVersion": str(rv[0])},
              "csi": {"driver": "rbd.csi.ceph.com" if sc == "standard" else "nfs.csi.k8s.io",
                      "volumeHandle": "0001-0009-ceph-" + uid("handle", name)[:18], "fsType": "ext4"}},
        status={"phase": "Bound"})


def service(name, selector, labels=None, annotations=None, headless=False, node_port=None, port=5432, owners=None):
    ip = "None" if headless else "10.96.%d.%d" % (len(objects) % 250, (len(objects) * 7) % 250 + 1)
    ports = [{"name": "tcp", "port": port, "protocol": "TCP", "targetPort": port}]
    if node_port:
        ports[0]["nodePort"] = node_port
    spec = {"clusterIP": ip, "clusterIPs": [ip], "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack", "ports": ports, "selector": selector,
            "sessionAffinity": "None", "type": "NodePort" if node_port else "ClusterIP"}
    if headless:
        spec["publishNotReadyAddresses"] = True
    if node_port:
        spec["externalTrafficPolicy"] = "Cluster"
    add("v1", "Service", meta("Service", name, labels=labels, annotations=annotations, owners=owners), spec=spec,
        status={"loadBalancer": {}})
    add("v1", "Endpoints", meta("Endpoints", name, labels=labels, manager="kube-controller-manager"),
        subsets=[{"addresses": [{"ip": "10.244.0.%d" % (len(objects) % 200 + 2), "nodeName": "node-1"}],
                  "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}]}])
    add("discovery.k8s.io/v1", "EndpointSlice",
        meta("EndpointSlice", name + "-x7k2p", labels={"kubernetes.io/service-name": name,
             "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
             owners=[owner("v1", "Service", name)], manager="kube-controller-manager"),
        addressType="IPv4", endpoints=[{"addresses": ["10.244.0.9"], "conditions": {"ready": True}}],
        ports=[{"name": "tcp", "port": port, "protocol": "TCP"}])


def pod(name, labels, owner_ref, spec, phase="Running"):
    spec = dict(spec)
    spec.update({"nodeName": "node-1", "restartPolicy": spec.get("restartPolicy", "Always"),
                 "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30})
    add("v1", "Pod", meta("Pod", name, labels=labels, owners=[owner_ref], manager="kubelet"), spec=spec,
        status={"phase": phase, "podIP": "10.244.0.%d" % (len(objects) % 200 + 2), "hostIP": "192.0.2.10",
                "startTime": T0})


# ---------------------------------------------------------------- namespace basics and noise
add("v1", "ConfigMap", meta("ConfigMap", "kube-root-ca.crt",
                            annotations={"kubernetes.io/description": "Contains a CA bundle"}),
    data={"ca.crt": "-----BEGIN CERTIFICATE-----\nMIIC/jCCAeagAwIBAgIBADANBgkqhkiG9w0BAQsFADAV\n-----END CERTIFICATE-----\n"})
add("v1", "ServiceAccount", meta("ServiceAccount", "default"), secrets=[{"name": "default-token-5xq2m"}])
add("v1", "Secret", meta("Secret", "default-token-5xq2m",
                         annotations={"kubernetes.io/service-account.name": "default",
                                      "kubernetes.io/service-account.uid": uid("ServiceAccount", NS, "default")}),
    type="kubernetes.io/service-account-token",
    data={"token": base64.b64encode(b"eyJhbGciOiJSUzI1NiJ9.e30.sig").decode(), "namespace": base64.b64encode(NS.encode()).decode()})
add("v1", "Event", meta("Event", "db-postgresql-0.187a3f0c2b9d1e44"),
    involvedObject={"kind": "Pod", "namespace": NS, "name": "db-postgresql-0"}, reason="Started",
    message="Started container postgresql", type="Normal", count=1)
add("events.k8s.io/v1", "Event", meta("Event", "web-7d9c5b8f6-abcde.187a3f0c2b9d1e45"),
    reason="Pulled", note="Container image already present", type="Normal", eventTime=None,
    regarding={"kind": "Pod", "namespace": NS, "name": "web-7d9c5b8f6-2xk4p"})

# ---------------------------------------------------------------- Helm release "db"
DB = "db-postgresql"
db_labels = helm_labels("db", "postgresql")
db_selector = {"app.kubernetes.io/instance": "db", "app.kubernetes.io/name": "postgresql",
               "app.kubernetes.io/component": "primary"}
add("v1", "ServiceAccount", meta("ServiceAccount", DB, labels=db_labels, annotations=helm_annotations("db"), manager="helm"),
    automountServiceAccountToken=False)
add("v1", "Secret", meta("Secret", DB, labels=db_labels, annotations=helm_annotations("db"), manager="helm"),
    type="Opaque", data={"postgres-password": base64.b64encode(b"s3cr3t-Pa55").decode()})
add("v1", "ConfigMap", meta("ConfigMap", DB + "-configuration", labels=db_labels, annotations=helm_annotations("db"),
                            manager="helm"),
    data={"postgresql.conf": "listen_addresses = '*'\nmax_connections = 200\nshared_buffers = 256MB\n"})
service(DB, db_selector, labels=db_labels, annotations=helm_annotations("db"))
service(DB + "-hl", db_selector, labels=db_labels, annotations=helm_annotations("db"), headless=True)
sts_spec = {
    "replicas": 2, "serviceName": DB + "-hl", "podManagementPolicy": "OrderedReady",
    "selector": {"matchLabels": db_selector},
    "updateStrategy": {"type": "RollingUpdate"},
    "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
    "template": {"metadata": {"labels": dict(db_labels)}, "spec": {
        "serviceAccountName": DB,
        "containers": [{"name": "postgresql", "image": "docker.io/bitnami/postgresql:17.2.0",
                        "env": [{"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": DB, "key": "postgres-password"}}}],
                        "ports": [{"containerPort": 5432, "name": "tcp-postgresql"}],
                        "volumeMounts": [{"name": "data", "mountPath": "/bitnami/postgresql"},
                                         {"name": "postgresql-config", "mountPath": "/bitnami/postgresql/conf"}]}],
        "volumes": [{"name": "postgresql-config", "configMap": {"name": DB + "-configuration"}}]}},
    "volumeClaimTemplates": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                              "metadata": {"name": "data"},
                              "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Gi"}},
                                       "volumeMode": "Filesystem"}}],
}
add("apps/v1", "StatefulSet", meta("StatefulSet", DB, labels=db_labels, annotations=helm_annotations("db"),
                                   generation=3, manager="helm"),
    spec=sts_spec, status={"replicas": 2, "readyReplicas": 2, "currentRevision": DB + "-6d4f7b9c8d",
                           "updateRevision": DB + "-6d4f7b9c8d", "observedGeneration": 3, "availableReplicas": 2})
add("apps/v1", "ControllerRevision", meta("ControllerRevision", DB + "-6d4f7b9c8d", labels=db_selector,
                                          owners=[owner("apps/v1", "StatefulSet", DB)], manager="kube-controller-manager"),
    revision=2, data={"spec": {"template": {"$patch": "replace"}}})
for i in range(2):
    pvc("data-%s-%d" % (DB, i), "8Gi", "standard", "ReadWriteOnce", labels=db_selector)
    pod("%s-%d" % (DB, i), dict(db_labels, **{"apps.kubernetes.io/pod-index": str(i),
                                             "statefulset.kubernetes.io/pod-name": "%s-%d" % (DB, i)}),
        owner("apps/v1", "StatefulSet", DB),
        {"hostname": "%s-%d" % (DB, i), "subdomain": DB + "-hl", "serviceAccountName": DB,
         "containers": sts_spec["template"]["spec"]["containers"],
         "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-%s-%d" % (DB, i)}}]
         + sts_spec["template"]["spec"]["volumes"]})


def manifest(extra=""):
    def doc(src, obj):
        return "---\n# Source: postgresql/templates/%s\n%s" % (src, obj)
    m = doc("serviceaccount.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: db-postgresql\n  namespace: \"shop\"\nautomountServiceAccountToken: false\n")
    m += doc("secrets.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db-postgresql\n  namespace: \"shop\"\ntype: Opaque\ndata:\n  postgres-password: \"czNjcjN0LVBhNTU=\"\n")
    m += doc("primary/configmap.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: db-postgresql-configuration\n  namespace: \"shop\"\ndata:\n  postgresql.conf: |-\n    listen_addresses = '*'\n")
    m += doc("primary/svc-headless.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: db-postgresql-hl\n  namespace: \"shop\"\nspec:\n  type: ClusterIP\n  clusterIP: None\n")
    m += doc("primary/svc.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: db-postgresql\nspec:\n  type: ClusterIP\n")
    m += doc("primary/networkpolicy.yaml", "")
    m += doc("primary/statefulset.yaml", "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db-postgresql\n  namespace: \"shop\"\nspec:\n  replicas: 2\n")
    return m + extra


def release(version, status, desc, extra_manifest=""):
    rel = {"name": "db", "namespace": NS, "version": version,
           "info": {"first_deployed": "2026-11-18T10:00:00Z", "last_deployed": "2026-11-%dT10:00:00Z" % (17 + version),
                    "deleted": "", "description": desc, "status": status, "notes": "PostgreSQL can be accessed via port 5432"},
           "chart": {"metadata": {"name": "postgresql", "version": "16.2.%d" % (version - 1), "appVersion": "17.2.0",
                                  "apiVersion": "v2", "type": "application"},
                     "lock": None, "templates": [], "values": {"architecture": "standalone"}, "schema": None, "files": []},
           "config": {"primary": {"persistence": {"size": "8Gi"}}, "readReplicas": {"replicaCount": 1}},
           "manifest": manifest(extra_manifest),
           "hooks": [{"name": "db-postgresql-pre-upgrade", "kind": "Job", "path": "postgresql/templates/hooks.yaml",
                      "manifest": "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: db-postgresql-pre-upgrade\n",
                      "events": ["pre-upgrade"], "last_run": {"started_at": "", "completed_at": "", "phase": ""},
                      "weight": 0, "delete_policies": ["hook-succeeded"]}]}
    raw = json.dumps(rel, separators=(",", ":")).encode()
    helm_text = base64.b64encode(gzip.compress(raw, compresslevel=9))
    add("v1", "Secret", meta("Secret", "sh.helm.release.v1.db.v%d" % version,
                             labels={"name": "db", "owner": "helm", "status": status, "version": str(version),
                                     "modifiedAt": "17637%05d" % version}, manager="helm"),
        type="helm.sh/release.v1", data={"release": base64.b64encode(helm_text).decode()})


release(1, "superseded", "Install complete")
release(2, "deployed", "Upgrade complete")
# Revision 3 tried to add a metrics Service and failed (its StatefulSet change was rejected);
# the Service it created stays, annotated as the release's.
release(3, "failed", "Upgrade \"db\" failed: timed out waiting for the condition",
        "---\n# Source: postgresql/templates/metrics-svc.yaml\napiVersion: v1\nkind: Service\nmetadata:\n  name: db-postgresql-metrics\n")
service(DB + "-metrics", db_selector, labels=helm_labels("db", "postgresql", "metrics"),
        annotations=helm_annotations("db"), port=9187)

# ---------------------------------------------------------------- web + worker sharing labels
web_labels = {"app.kubernetes.io/part-of": "shop", "app.kubernetes.io/component": "web", "app": "web"}
worker_labels = {"app.kubernetes.io/part-of": "shop", "app.kubernetes.io/component": "worker", "app": "worker"}
add("v1", "ServiceAccount", meta("ServiceAccount", "web", labels=web_labels))
add("v1", "ConfigMap", meta("ConfigMap", "web-config"), data={"SHOP_DB_HOST": "db-postgresql.shop.svc"})
add("v1", "Secret", meta("Secret", "web-tls"), type="kubernetes.io/tls",
    data={"tls.crt": base64.b64encode(b"CERT").decode(), "tls.key": base64.b64encode(b"KEY").decode()})
add("v1", "Secret", meta("Secret", "registry-creds"), type="kubernetes.io/dockerconfigjson",
    data={".dockerconfigjson": base64.b64encode(b'{"auths":{}}').decode()})
pvc("web-uploads", "20Gi", "nfs", "ReadWriteMany", labels=web_labels)
web_template = {"metadata": {"labels": dict(web_labels)}, "spec": {
    "serviceAccountName": "web", "imagePullSecrets": [{"name": "registry-creds"}],
    "containers": [{"name": "web", "image": "registry.example/shop/web:2.4.1",
                    "envFrom": [{"configMapRef": {"name": "web-config"}}],
                    "volumeMounts": [{"name": "uploads", "mountPath": "/srv/uploads"}, {"name": "tls", "mountPath": "/tls"}]}],
    "volumes": [{"name": "uploads", "persistentVolumeClaim": {"claimName": "web-uploads"}},
                {"name": "tls", "secret": {"secretName": "web-tls"}}]}}
add("apps/v1", "Deployment", meta("Deployment", "web", labels=web_labels, generation=4,
                                  annotations={"deployment.kubernetes.io/revision": "4"}),
    spec={"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": web_template,
          "strategy": {"type": "RollingUpdate"}},
    status={"replicas": 2, "readyReplicas": 2, "observedGeneration": 4})
add("apps/v1", "ReplicaSet", meta("ReplicaSet", "web-7d9c5b8f6", labels=dict(web_labels, **{"pod-template-hash": "7d9c5b8f6"}),
                                  owners=[owner("apps/v1", "Deployment", "web")], generation=1, manager="kube-controller-manager"),
    spec={"replicas": 2, "selector": {"matchLabels": {"app": "web", "pod-template-hash": "7d9c5b8f6"}}, "template": web_template},
    status={"replicas": 2})
pod("web-7d9c5b8f6-2xk4p", dict(web_labels, **{"pod-template-hash": "7d9c5b8f6"}),
    owner("apps/v1", "ReplicaSet", "web-7d9c5b8f6"), web_template["spec"])
service("web", {"app": "web"}, labels=web_labels, node_port=30080, port=8080)
add("batch/v1", "Job", meta("Job", "web-migrate-29120", labels=dict(web_labels, **{
    "batch.kubernetes.io/controller-uid": uid("Job", NS, "web-migrate-29120"),
    "controller-uid": uid("Job", NS, "web-migrate-29120"), "job-name": "web-migrate-29120"}), generation=1),
    spec={"backoffLimit": 3, "completions": 1,
          "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": uid("Job", NS, "web-migrate-29120")}},
          "template": {"metadata": {"labels": {"batch.kubernetes.io/controller-uid": uid("Job", NS, "web-migrate-29120"),
                                               "job-name": "web-migrate-29120"}},
                       "spec": {"restartPolicy": "Never", "containers": [{"name": "migrate", "image": "registry.example/shop/web:2.4.1"}]}}},
    status={"succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": T0}]})
pod("web-migrate-29120-q8v7n", dict(web_labels, **{"job-name": "web-migrate-29120"}),
    owner("batch/v1", "Job", "web-migrate-29120"),
    {"restartPolicy": "Never", "containers": [{"name": "migrate", "image": "registry.example/shop/web:2.4.1"}]},
    phase="Succeeded")
add("apps/v1", "Deployment", meta("Deployment", "worker", labels=worker_labels, generation=2),
    spec={"replicas": 1, "selector": {"matchLabels": {"app": "worker"}}, "template": {
        "metadata": {"labels": dict(worker_labels)}, "spec": {"containers": [{
            "name": "worker", "image": "registry.example/shop/worker:2.4.1",
            "env": [{"name": "DB_HOST", "valueFrom": {"configMapKeyRef": {"name": "web-config", "key": "SHOP_DB_HOST"}}}]}]}}},
    status={"replicas": 1})

# ---------------------------------------------------------------- operator: RedisCluster
CRD = "redisclusters.cache.example.com"
add("apiextensions.k8s.io/v1", "CustomResourceDefinition", meta("CustomResourceDefinition", CRD, ns=None, generation=1),
    spec={"group": "cache.example.com", "scope": "Namespaced",
          "names": {"kind": "RedisCluster", "listKind": "RedisClusterList", "plural": "redisclusters", "singular": "rediscluster"},
          "versions": [{"name": "v1", "served": True, "storage": True,
                        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    status={"conditions": [{"type": "Established", "status": "True"}], "storedVersions": ["v1"]})
cr_owner = owner("cache.example.com/v1", "RedisCluster", "sessions")
add("cache.example.com/v1", "RedisCluster", meta("RedisCluster", "sessions", generation=2),
    spec={"replicas": 1, "storage": {"size": "2Gi", "storageClassName": "standard"}},
    status={"phase": "Ready", "observedGeneration": 2})
redis_labels = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/instance": "sessions",
                "app.kubernetes.io/managed-by": "redis-operator"}
add("v1", "Secret", meta("Secret", "sessions-auth", labels=redis_labels, owners=[cr_owner], manager="redis-operator"),
    type="Opaque", data={"password": base64.b64encode(b"redis-pw").decode()})
service("sessions-redis", {"app.kubernetes.io/instance": "sessions"}, labels=redis_labels, port=6379, owners=[cr_owner])
add("apps/v1", "StatefulSet", meta("StatefulSet", "sessions-redis", labels=redis_labels, owners=[cr_owner], generation=1,
                                   manager="redis-operator"),
    spec={"replicas": 1, "serviceName": "sessions-redis", "selector": {"matchLabels": {"app.kubernetes.io/instance": "sessions"}},
          "template": {"metadata": {"labels": dict(redis_labels)}, "spec": {"containers": [{
              "name": "redis", "image": "docker.io/library/redis:7.4",
              "env": [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sessions-auth", "key": "password"}}}],
              "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}},
          "volumeClaimTemplates": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
                                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
                                             "resources": {"requests": {"storage": "2Gi"}}, "volumeMode": "Block"}}]},
    status={"replicas": 1, "readyReplicas": 1})
pvc("data-sessions-redis-0", "2Gi", "standard", "ReadWriteOnce", labels={"app.kubernetes.io/instance": "sessions"}, mode="Block")
pod("sessions-redis-0", redis_labels, owner("apps/v1", "StatefulSet", "sessions-redis"),
    {"containers": [{"name": "redis", "image": "docker.io/library/redis:7.4"}],
     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-sessions-redis-0"}}]})

OP = "operators"
op_labels = {"app.kubernetes.io/name": "redis-operator"}
add("v1", "ServiceAccount", meta("ServiceAccount", "redis-operator", ns=OP, labels=op_labels))
add("rbac.authorization.k8s.io/v1", "ClusterRole", meta("ClusterRole", "redis-operator", ns=None, labels=op_labels),
    rules=[{"apiGroups": ["cache.example.com"], "resources": ["redisclusters", "redisclusters/status"], "verbs": ["*"]},
           {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["*"]}])
add("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", meta("ClusterRoleBinding", "redis-operator", ns=None, labels=op_labels),
    roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "redis-operator"},
    subjects=[{"kind": "ServiceAccount", "name": "redis-operator", "namespace": OP}])
add("rbac.authorization.k8s.io/v1", "ClusterRole", meta("ClusterRole", "view", ns=None),
    rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
add("apps/v1", "Deployment", meta("Deployment", "redis-operator", ns=OP, labels=op_labels, generation=1),
    spec={"replicas": 1, "selector": {"matchLabels": op_labels}, "template": {"metadata": {"labels": dict(op_labels)}, "spec": {
        "serviceAccountName": "redis-operator",
        "containers": [{"name": "manager", "image": "registry.example/redis-operator:1.3.0"}]}}},
    status={"replicas": 1})
add("v1", "Service", meta("Service", "redis-operator-webhook", ns=OP, labels=op_labels),
    spec={"clusterIP": "10.96.44.4", "clusterIPs": ["10.96.44.4"], "type": "ClusterIP", "selector": op_labels,
          "ports": [{"port": 443, "targetPort": 9443, "protocol": "TCP"}]}, status={"loadBalancer": {}})
add("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration",
    meta("ValidatingWebhookConfiguration", "redis-operator", ns=None, labels=op_labels, generation=1),
    webhooks=[{"name": "vrediscluster.cache.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
               "failurePolicy": "Fail",
               "clientConfig": {"service": {"name": "redis-operator-webhook", "namespace": OP, "path": "/validate", "port": 443}},
               "rules": [{"apiGroups": ["cache.example.com"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                          "resources": ["redisclusters"]}]}])

out = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": objects}
with open("examples/data/sample-app.json", "w") as f:
    json.dump(out, f, indent=4)
    f.write("\n")
print("%d objects" % len(objects))

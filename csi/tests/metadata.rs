//! The changed-block metadata client against an in-process SnapshotMetadata gRPC server over TLS
//! (a CA and server certificate made by rcgen, the CA handed over as the CR's `caCert`) and the
//! mock API server holding the SnapshotMetadataService, the snapshots and their contents, and
//! answering TokenRequests. Ends with a backup chain fed by the ranges the service lists.

mod support;

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use k8s_openapi::ByteString;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{Value, json};
use strata_chain::{ByteRange, ChangeSource, DigestAlgorithm, backup, parse_changed_ranges};
use strata_csi::Error;
use strata_csi::metadata::proto::snapshot_metadata_server::{
    SnapshotMetadata, SnapshotMetadataServer,
};
use strata_csi::metadata::proto::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use strata_csi::metadata::{
    ChangedBlocks, ChangedBlocksRequest, DeltaBase, FetchOptions, SnapshotMetadataService,
    SnapshotMetadataServiceSpec, Violation, changed_blocks, write_changed_ranges,
};
use strata_qcow2::{FileSink, Image, WriterOptions, hydrate};
use support::Mock;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

const DRIVER: &str = "hostpath.csi.k8s.io";
const AUDIENCE: &str = "strata-backup";
const CONTENTS: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents";
const SNAPSHOTS: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots";
const SERVICES: &str = "/apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices";
const TOKEN: &str = "/api/v1/namespaces/backup/serviceaccounts/strata/token";
const REVIEWS: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";

/// One message: type, capacity, tuples.
type Message = (i32, i64, Vec<(i64, i64)>);
/// One message as sent, or the status that ends the stream.
type Sent = Result<(i32, i64, Vec<BlockMetadata>), Status>;

/// What one call asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Call {
    method: &'static str,
    namespace: String,
    snapshots: String,
    starting_offset: i64,
}

/// A SnapshotMetadata service over a fixed list of tuples.
struct Fake {
    kind: BlockMetadataType,
    capacity: i64,
    tuples: Vec<(i64, i64)>,
    per_message: usize,
    /// Successive calls break after this many messages (with UNAVAILABLE); later ones don't.
    breaks: Mutex<VecDeque<usize>>,
    /// Messages sent verbatim instead of the tuples, for hostile replies.
    verbatim: Option<Vec<Message>>,
    calls: Mutex<Vec<Call>>,
}

impl Fake {
    fn new(kind: BlockMetadataType, capacity: i64, tuples: &[(i64, i64)]) -> Self {
        Fake {
            kind,
            capacity,
            tuples: tuples.to_vec(),
            per_message: 2,
            breaks: Mutex::default(),
            verbatim: None,
            calls: Mutex::default(),
        }
    }

    fn breaking(self, breaks: &[usize]) -> Self {
        *self.breaks.lock().unwrap() = breaks.iter().copied().collect();
        self
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Checks the token and records the call; the messages from `starting_offset` on, as the
    /// API says: no tuple ending at or before it.
    fn answer(&self, token: &str, call: Call) -> Result<Vec<Sent>, Status> {
        if token != format!("token-of-backup/strata-for-{AUDIENCE}") {
            return Err(Status::unauthenticated("token not for this audience"));
        }
        let start = call.starting_offset;
        self.calls.lock().unwrap().push(call);
        let messages: Vec<Message> = match &self.verbatim {
            Some(messages) => messages.clone(),
            None => self
                .tuples
                .iter()
                .filter(|(offset, size)| offset + size > start)
                .copied()
                .collect::<Vec<_>>()
                .chunks(self.per_message)
                .map(|chunk| (self.kind as i32, self.capacity, chunk.to_vec()))
                .collect(),
        };
        let mut replies: Vec<_> = messages
            .into_iter()
            .map(|(kind, capacity, tuples)| {
                let tuples = tuples
                    .into_iter()
                    .map(|(byte_offset, size_bytes)| BlockMetadata {
                        byte_offset,
                        size_bytes,
                    })
                    .collect();
                Ok((kind, capacity, tuples))
            })
            .collect();
        if let Some(after) = self.breaks.lock().unwrap().pop_front() {
            replies.truncate(after);
            replies.push(Err(Status::unavailable("connection reset by peer")));
        }
        Ok(replies)
    }
}

type Replies<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotMetadata for Fake {
    type GetMetadataAllocatedStream = Replies<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Replies<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = request.into_inner();
        let call = Call {
            method: "allocated",
            namespace: r.namespace,
            snapshots: r.snapshot_name,
            starting_offset: r.starting_offset,
        };
        let replies = self.answer(&r.security_token, call)?.into_iter().map(|m| {
            m.map(|(kind, capacity, tuples)| GetMetadataAllocatedResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: capacity,
                block_metadata: tuples,
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(
            replies.collect::<Vec<_>>(),
        ))))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = request.into_inner();
        let call = Call {
            method: "delta",
            namespace: r.namespace,
            snapshots: format!("{} -> {}", r.base_snapshot_id, r.target_snapshot_name),
            starting_offset: r.starting_offset,
        };
        let replies = self.answer(&r.security_token, call)?.into_iter().map(|m| {
            m.map(|(kind, capacity, tuples)| GetMetadataDeltaResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: capacity,
                block_metadata: tuples,
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(
            replies.collect::<Vec<_>>(),
        ))))
    }
}

/// A CA and a certificate for 127.0.0.1 it signed, in PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "strata test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Serves `fake` over TLS on 127.0.0.1; returns its address.
async fn serve(fake: Arc<Fake>, pki: &Pki) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&pki.cert, &pki.key)))
        .unwrap()
        .add_service(SnapshotMetadataServer::from_arc(fake))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    address
}

fn snapshot(name: &str, content: &str) -> Value {
    json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"source": {"persistentVolumeClaimName": "data"}},
           "status": {"boundVolumeSnapshotContentName": content, "readyToUse": true}})
}

fn content(name: &str, driver: &str, handle: &str) -> Value {
    json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
           "metadata": {"name": name},
           "spec": {"volumeSnapshotRef": {"name": "x", "namespace": "shop"},
                    "deletionPolicy": "Delete", "driver": driver,
                    "source": {"volumeHandle": "vol-1"}},
           "status": {"snapshotHandle": handle, "readyToUse": true}})
}

/// A cluster with snapshots `monday` (base) and `tuesday` of `DRIVER`, the driver's
/// SnapshotMetadataService at `address` trusting `ca`, the client running as service account
/// backup/strata, and TokenRequests answered with a token naming account and audience.
fn cluster(address: &str, ca: &str) -> Mock {
    let mock = Mock::default();
    mock.put(
        &format!("{SNAPSHOTS}/monday"),
        snapshot("monday", "content-monday"),
    );
    mock.put(
        &format!("{SNAPSHOTS}/tuesday"),
        snapshot("tuesday", "content-tuesday"),
    );
    mock.put(
        &format!("{CONTENTS}/content-monday"),
        content("content-monday", DRIVER, "snap-handle-monday"),
    );
    mock.put(
        &format!("{CONTENTS}/content-tuesday"),
        content("content-tuesday", DRIVER, "snap-handle-tuesday"),
    );
    let mut service = SnapshotMetadataService::new(
        DRIVER,
        SnapshotMetadataServiceSpec {
            audience: AUDIENCE.to_owned(),
            address: address.to_owned(),
            ca_cert: ByteString(ca.as_bytes().to_vec()),
        },
    );
    service.metadata.uid = Some("sms-1".to_owned());
    mock.put(
        &format!("{SERVICES}/{DRIVER}"),
        serde_json::to_value(&service).unwrap(),
    );
    mock.answer(REVIEWS, |_| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
               "metadata": {}, "status": {"userInfo": {"username": "system:serviceaccount:backup:strata"}}})
    });
    mock.answer(TOKEN, |request| {
        let audiences = request["spec"]["audiences"].as_array().unwrap();
        assert_eq!(request["kind"], "TokenRequest");
        assert!(request["spec"]["expirationSeconds"].as_i64().unwrap() >= 600);
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "metadata": {},
               "spec": request["spec"],
               "status": {"token": format!("token-of-backup/strata-for-{}", audiences[0].as_str().unwrap()),
                          "expirationTimestamp": "2026-11-25T19:00:00Z"}})
    });
    mock
}

fn fast() -> FetchOptions {
    FetchOptions {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..FetchOptions::default()
    }
}

fn ranges(pairs: &[(u64, u64)]) -> Vec<ByteRange> {
    pairs
        .iter()
        .map(|&(offset, length)| ByteRange { offset, length })
        .collect()
}

/// Serves `fake` and asks it about `tuesday`, with `monday` as base when `delta`.
async fn ask(
    fake: &Arc<Fake>,
    delta: bool,
    options: &FetchOptions,
) -> (strata_csi::Result<ChangedBlocks>, Mock) {
    let pki = pki();
    let address = serve(fake.clone(), &pki).await;
    let mock = cluster(&address, &pki.ca);
    let request = ChangedBlocksRequest::new("shop", "tuesday", delta.then(|| "monday".into()));
    (
        changed_blocks(&mock.client(), &request, options).await,
        mock,
    )
}

fn call(method: &'static str, snapshots: &str, starting_offset: i64) -> Call {
    Call {
        method,
        namespace: "shop".to_owned(),
        snapshots: snapshots.to_owned(),
        starting_offset,
    }
}

#[tokio::test]
async fn allocated_fixed_length_blocks_become_merged_ranges() {
    let fake = Arc::new(Fake::new(
        BlockMetadataType::FixedLength,
        1 << 20,
        &[
            (0, 4096),
            (4096, 4096),
            (65536, 4096),
            (69632, 4096),
            (1044480, 4096),
        ],
    ));
    let (result, mock) = ask(&fake, false, &fast()).await;
    let changed = result.unwrap();
    assert_eq!(
        changed.ranges,
        ranges(&[(0, 8192), (65536, 8192), (1044480, 4096)])
    );
    assert_eq!(changed.volume_capacity, Some(1 << 20));
    assert_eq!(
        changed.block_metadata_type,
        Some(BlockMetadataType::FixedLength)
    );
    assert_eq!((changed.granularity, changed.calls), (1, 1));
    assert_eq!(fake.calls(), [call("allocated", "tuesday", 0)]);
    let requests = mock.requests();
    assert!(requests.contains(&format!("POST {TOKEN}")), "{requests:?}");
    assert!(requests.contains(&format!("GET {SERVICES}/{DRIVER}")));
}

#[tokio::test]
async fn delta_of_variable_length_extents_names_the_base_by_its_csi_handle() {
    let fake = Arc::new(Fake::new(
        BlockMetadataType::VariableLength,
        1 << 30,
        &[(512, 1000), (1512, 88), (1 << 29, 3 << 20)],
    ));
    let (result, _) = ask(&fake, true, &fast()).await;
    let changed = result.unwrap();
    assert_eq!(changed.ranges, ranges(&[(512, 1088), (1 << 29, 3 << 20)]));
    assert_eq!(
        changed.block_metadata_type,
        Some(BlockMetadataType::VariableLength)
    );
    assert_eq!(
        fake.calls(),
        [call("delta", "snap-handle-monday -> tuesday", 0)]
    );
}

#[tokio::test]
async fn a_recorded_base_handle_is_used_without_reading_the_base_snapshot() {
    let fake = Arc::new(Fake::new(
        BlockMetadataType::FixedLength,
        1 << 20,
        &[(8192, 4096)],
    ));
    let pki = pki();
    let address = serve(fake.clone(), &pki).await;
    let mock = cluster(&address, &pki.ca);
    let mut request = ChangedBlocksRequest::new("shop", "tuesday", None);
    request.base = Some(DeltaBase::Handle("snap-handle-recorded".into()));
    let changed = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap();
    assert_eq!(changed.ranges, ranges(&[(8192, 4096)]));
    assert_eq!(
        fake.calls(),
        [call("delta", "snap-handle-recorded -> tuesday", 0)]
    );
    let requests = mock.requests();
    assert!(
        !requests.iter().any(|r| r.contains("monday")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn a_broken_stream_resumes_after_the_last_range_received() {
    let tuples: Vec<(i64, i64)> = (0..10).map(|i| (i * 100_000, 5000 + i)).collect();
    // Two messages of two tuples, then the stream breaks; the second call breaks after one.
    let fake =
        Arc::new(Fake::new(BlockMetadataType::VariableLength, 1 << 20, &tuples).breaking(&[2, 1]));
    let (result, _) = ask(&fake, true, &fast()).await;
    let changed = result.unwrap();
    let expected: Vec<(u64, u64)> = tuples.iter().map(|&(o, s)| (o as u64, s as u64)).collect();
    assert_eq!(changed.ranges, ranges(&expected));
    assert_eq!(changed.calls, 3);
    let base = "snap-handle-monday -> tuesday";
    assert_eq!(
        fake.calls(),
        [
            call("delta", base, 0),
            call("delta", base, 300_000 + 5003),
            call("delta", base, 500_000 + 5005),
        ]
    );
}

#[tokio::test]
async fn a_service_that_keeps_failing_is_given_up_after_the_attempts() {
    let fake = Arc::new(
        Fake::new(BlockMetadataType::FixedLength, 1 << 20, &[(0, 4096)]).breaking(&[0; 10]),
    );
    let options = FetchOptions {
        attempts: 3,
        ..fast()
    };
    let (result, _) = ask(&fake, false, &options).await;
    match result {
        Err(Error::MetadataCall {
            call: "GetMetadataAllocated",
            code: Code::Unavailable,
            calls: 3,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test]
async fn hostile_replies_are_rejected_without_retrying() {
    let fixed = BlockMetadataType::FixedLength as i32;
    let variable = BlockMetadataType::VariableLength as i32;
    let cases: Vec<(Vec<Message>, i32, Violation)> = vec![
        (
            vec![(variable, 1 << 20, vec![(0, 10), ((1 << 20) - 10, 11)])],
            0,
            Violation::PastCapacity {
                offset: (1 << 20) - 10,
                size: 11,
                capacity: 1 << 20,
            },
        ),
        (
            vec![
                (variable, 1 << 20, vec![(0, 10), (100, 50)]),
                (variable, 1 << 20, vec![(120, 10)]),
            ],
            0,
            Violation::OutOfOrder {
                offset: 120,
                size: 10,
                previous_end: 150,
            },
        ),
        (
            vec![(
                fixed,
                1 << 20,
                (0..1000).map(|i| (i * 4096, 4096)).collect(),
            )],
            64,
            Violation::TooManyTuples {
                count: 1000,
                limit: 64,
            },
        ),
        (
            vec![
                (variable, 1 << 20, vec![(0, 10)]),
                (variable, 1 << 21, vec![]),
            ],
            0,
            Violation::CapacityChanged {
                was: 1 << 20,
                now: 1 << 21,
            },
        ),
        (
            vec![(0, 1 << 20, vec![(0, 10)])],
            0,
            Violation::UnknownType(0),
        ),
    ];
    for (messages, max_results, expected) in cases {
        let mut fake = Fake::new(BlockMetadataType::VariableLength, 1 << 20, &[]);
        fake.verbatim = Some(messages);
        let fake = Arc::new(fake);
        let options = FetchOptions {
            max_results,
            ..fast()
        };
        let (result, _) = ask(&fake, true, &options).await;
        match result {
            Err(Error::BadMetadata {
                call: "GetMetadataDelta",
                violation,
                ..
            }) => assert_eq!(violation, expected),
            other => panic!("{expected}: {other:?}"),
        }
        assert_eq!(fake.calls().len(), 1, "{expected}: retried");
    }
}

#[tokio::test]
async fn a_driver_without_metadata_service_is_named() {
    let mock = Mock::default();
    mock.put(
        &format!("{SNAPSHOTS}/tuesday"),
        snapshot("tuesday", "content-tuesday"),
    );
    mock.put(
        &format!("{CONTENTS}/content-tuesday"),
        content("content-tuesday", "ebs.csi.aws.com", "snap-1"),
    );
    let request = ChangedBlocksRequest::new("shop", "tuesday", None);
    let err = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NoMetadataService { driver } if driver == "ebs.csi.aws.com"),
        "{err}"
    );
    assert!(err.to_string().contains("offers no changed-block tracking"));
}

#[tokio::test]
async fn a_base_without_handle_or_from_another_driver_is_refused() {
    let fake = Arc::new(Fake::new(BlockMetadataType::FixedLength, 1 << 20, &[]));
    let pki = pki();
    let address = serve(fake.clone(), &pki).await;
    let mock = cluster(&address, &pki.ca);
    let request = ChangedBlocksRequest::new("shop", "tuesday", Some("monday".into()));
    let mut base = content("content-monday", DRIVER, "x");
    base["status"] = json!({"readyToUse": false});
    mock.put(&format!("{CONTENTS}/content-monday"), base);
    let err = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingField {
                what: "status.snapshotHandle",
                ..
            }
        ),
        "{err}"
    );
    mock.put(
        &format!("{CONTENTS}/content-monday"),
        content("content-monday", "other.csi.example", "h"),
    );
    let err = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                what: "base snapshot",
                ..
            }
        ),
        "{err}"
    );
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused_by_the_service() {
    let fake = Arc::new(Fake::new(BlockMetadataType::FixedLength, 1 << 20, &[]));
    let pki = pki();
    let address = serve(fake.clone(), &pki).await;
    let mock = cluster(&address, &pki.ca);
    let mut service: Value = mock.get(&format!("{SERVICES}/{DRIVER}")).unwrap();
    service["spec"]["audience"] = json!("someone-else");
    mock.put(&format!("{SERVICES}/{DRIVER}"), service);
    let request = ChangedBlocksRequest::new("shop", "tuesday", None);
    let err = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MetadataCall {
                code: Code::Unauthenticated,
                calls: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_service_certificate_from_another_ca_is_refused() {
    let fake = Arc::new(Fake::new(BlockMetadataType::FixedLength, 1 << 20, &[]));
    let pki = pki();
    let address = serve(fake.clone(), &pki).await;
    let mock = cluster(&address, &self::pki().ca);
    let request = ChangedBlocksRequest::new("shop", "tuesday", None);
    let err = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MetadataConnect { .. }), "{err}");
    let mock = cluster(&address, "not a certificate");
    let err = changed_blocks(&mock.client(), &request, &fast())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::BadMetadataService { what: "caCert", .. }),
        "{err}"
    );
    assert!(fake.calls().is_empty());
}

/// kube's rustls client and the gRPC TLS channel agree on one crypto provider: building a kube
/// client for an https cluster (which makes its rustls config) and then calling the service
/// over TLS in the same process must not panic.
#[tokio::test]
async fn a_kube_tls_client_and_the_grpc_tls_channel_share_one_process() {
    let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    let kube_client = kube::Client::try_from(config).unwrap();
    assert_eq!(kube_client.default_namespace(), "default");
    let fake = Arc::new(Fake::new(
        BlockMetadataType::FixedLength,
        1 << 20,
        &[(0, 4096)],
    ));
    let (result, _) = ask(&fake, false, &fast()).await;
    assert_eq!(result.unwrap().ranges, ranges(&[(0, 4096)]));
    let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    kube::Client::try_from(config).unwrap();
}

/// Full backup, then the volume changes, the service lists the changed extents (its stream
/// breaking once), the list goes through the `--changed-ranges` file, and the incremental
/// backup made from it restores to exactly the changed volume, per strata and per qemu-img.
#[tokio::test]
async fn delta_ranges_drive_an_incremental_backup_that_restores_the_volume() {
    const SIZE: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let volume_path = dir.path().join("volume.raw");
    let volume = File::create(&volume_path).unwrap();
    volume.set_len(SIZE).unwrap();
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    volume.write_all_at(&pattern[..(3 << 20)], 0).unwrap();

    let mut options = WriterOptions::default();
    options.cluster_size = 65536;
    let (_, full) = backup(
        &File::open(&volume_path).unwrap(),
        FileSink::create(dir.path().join("0.qcow2")).unwrap(),
        &options,
        ChangeSource::Full,
        DigestAlgorithm::Blake3,
        &mut |_| {},
    )
    .unwrap();

    // Unaligned writes, one spanning a cluster boundary, one in the never-written tail.
    let extents: [(i64, i64); 4] = [(100, 10), (65530, 20), (1 << 20, 300_000), (3_500_000, 1)];
    for &(offset, size) in &extents {
        volume
            .write_all_at(&vec![0xa5; size as usize], offset as u64)
            .unwrap();
    }
    let fake = Arc::new(
        Fake::new(BlockMetadataType::VariableLength, SIZE as i64, &extents).breaking(&[1]),
    );
    let (result, _) = ask(&fake, true, &fast()).await;
    let changed = result.unwrap();
    assert_eq!(changed.calls, 2);
    let mut file = Vec::new();
    write_changed_ranges(&mut file, &changed.ranges).unwrap();
    let ranges = parse_changed_ranges(&file).unwrap();
    assert_eq!(ranges.len(), 4);

    options.backing_file = Some("0.qcow2".to_owned());
    let (_, incremental) = backup(
        &File::open(&volume_path).unwrap(),
        FileSink::create(dir.path().join("1.qcow2")).unwrap(),
        &options,
        ChangeSource::ChangedRanges {
            ranges: &ranges,
            previous: Some(&full.digests),
        },
        DigestAlgorithm::Blake3,
        &mut |_| {},
    )
    .unwrap();
    // Only the clusters the ranges touch are read and stored: 0 and 1, 16 to 20, and 53.
    let summary = incremental.summary;
    assert_eq!(summary.data_clusters + summary.compressed_clusters, 8);

    let restored_path = dir.path().join("restored.raw");
    let restored = File::create(&restored_path).unwrap();
    hydrate(
        &Image::open(dir.path().join("1.qcow2")).unwrap(),
        &restored,
        "restored",
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&restored_path).unwrap(),
        std::fs::read(&volume_path).unwrap()
    );
    let compare = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(dir.path().join("1.qcow2"))
        .arg(&volume_path)
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );
}

//! `strata install`: print the manifests a cluster needs, for `kubectl apply -f -`.

use std::io::Write;

use anyhow::Context;
use strata::operator::install::{DEFAULT_NAMESPACE, Install, NfsMount, manifests};
use strata::operator::policy::{GroupResource, NamespaceGrant};

/// Arguments of `strata install`.
#[derive(clap::Args)]
pub struct Args {
    /// An application namespace whose volumes are backed up: it gets the datamover's
    /// ServiceAccount and bindings (repeat for each).
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// The image holding `strata-controller` and `strata` (see Containerfile).
    #[arg(long, value_name = "IMG", default_value = concat!("strata:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The controller's namespace.
    #[arg(long, value_name = "NS", default_value = DEFAULT_NAMESPACE)]
    controller_namespace: String,
    /// The NFS export of a folder Target, mounted into the controller at PATH, the folder its
    /// Targets' URLs name (repeat for each; the Target's `spec.nfs` names the same export).
    #[arg(long = "nfs-target", value_name = "PATH=SERVER:EXPORT")]
    nfs_targets: Vec<NfsMount>,
    /// A kind Restores may create besides the usual application kinds, as RBAC names it
    /// (`RESOURCE.GROUP`, e.g. `postgresclusters.postgres-operator.crunchydata.com`): granted
    /// to the controller and passed to it (repeat for each).
    #[arg(long = "restore-kind", value_name = "RESOURCE.GROUP")]
    restore_kinds: Vec<GroupResource>,
    /// Let Restores in namespace FROM write into namespace INTO (a name, a prefix ending in
    /// `*`, or `*`; FROM may be `*`); by default a Restore writes only into its own namespace
    /// (repeat for each).
    #[arg(long = "restore-into", value_name = "FROM=INTO")]
    restore_into: Vec<NamespaceGrant>,
    /// The controller's bound on datamover pods per node (its default, 2, when absent; 0 for
    /// none).
    #[arg(long, value_name = "N")]
    max_datamovers_per_node: Option<usize>,
}

/// Print the CRDs, the controller and the datamovers' accounts as one YAML stream.
pub fn run(args: Args) -> anyhow::Result<()> {
    let install = Install {
        image: args.image,
        namespace: args.controller_namespace,
        app_namespaces: args.namespaces,
        nfs_targets: args.nfs_targets,
        restore_kinds: args.restore_kinds,
        restore_into: args.restore_into,
        max_datamovers_per_node: args.max_datamovers_per_node,
    };
    let yaml = manifests(&install)?;
    std::io::stdout()
        .lock()
        .write_all(yaml.as_bytes())
        .context("writing the manifests")?;
    Ok(())
}

//! `strata discover`: list the objects and volumes of an application, in restore order.

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;
use strata::discovery::{
    AppSpec, DumpSource, Inventory, LiveSource, MetadataBackup, ObjectRef, ObjectSource,
    RestoreOrder, Volume, discover,
};

/// Find the objects and volumes of an application (Helm releases, operator instances, label
/// selectors) in an offline dump or, without `--objects`, in the cluster of the current
/// kubeconfig or in-cluster config.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Offline dump: `kubectl get -o json` output, or a folder of YAML/JSON manifests.
    #[arg(long, value_name = "DUMP")]
    objects: Option<PathBuf>,
    /// The application's namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// A Helm release in the namespace (repeatable).
    #[arg(long = "helm-release", value_name = "NAME")]
    helm_releases: Vec<String>,
    /// A custom resource managed by an operator, as GROUP/KIND/NAME (repeatable).
    #[arg(long = "operator", value_name = "GROUP/KIND/NAME")]
    operators: Vec<String>,
    /// A label selector, e.g. 'app.kubernetes.io/part-of=shop,tier in (web)' (repeatable).
    #[arg(long = "selector", short = 'l', value_name = "SELECTOR")]
    selectors: Vec<String>,
    /// Also take the operators themselves (Deployment, RBAC, CRDs, webhooks, OLM objects).
    #[arg(long)]
    include_operators: bool,
    /// Other namespaces to read, e.g. where the operators run.
    #[arg(long = "also-namespace", value_name = "NS")]
    also_namespaces: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Json)]
    output: Output,
    /// Also write the sanitized metadata archive (tar.gz of YAML) here.
    #[arg(long, value_name = "FILE")]
    archive: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    Json,
    Text,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VolumeLine<'a> {
    namespace: &'a str,
    pvc: &'a str,
    storage_class: Option<&'a str>,
    size: Option<&'a str>,
    volume_mode: &'a str,
    access_modes: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_name: Option<&'a str>,
}

#[derive(Serialize)]
struct Report<'a> {
    resources: Vec<ObjectRef>,
    volumes: Vec<VolumeLine<'a>>,
}

async fn inventory<S: ObjectSource>(
    source: &S,
    namespaces: &[String],
) -> anyhow::Result<Inventory> {
    Ok(Inventory::collect(source, namespaces).await?)
}

/// Run `strata discover`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let spec = AppSpec {
        namespace: args.namespace.clone(),
        helm_releases: args.helm_releases.clone(),
        operators: args
            .operators
            .iter()
            .map(|o| o.parse())
            .collect::<Result<_, _>>()?,
        selectors: args
            .selectors
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?,
        include_operators: args.include_operators,
    };
    let mut namespaces = vec![args.namespace.clone()];
    namespaces.extend(args.also_namespaces.iter().cloned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let inventory = match &args.objects {
        Some(path) => {
            let source = DumpSource::from_path(path)
                .with_context(|| format!("reading {}", path.display()))?;
            runtime.block_on(inventory(&source, &namespaces))?
        }
        None => runtime.block_on(async {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the cluster (kubeconfig or in-cluster)")?;
            inventory(&LiveSource::new(client), &namespaces).await
        })?,
    };
    let app = discover(&inventory, &spec)?;
    let backup = MetadataBackup::from_application(&app, &RestoreOrder::default())?;
    if let Some(path) = &args.archive {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        backup.write_archive(std::io::BufWriter::new(file))?;
    }
    let resources = backup.references()?;
    match args.output {
        Output::Json => {
            let volumes = app.volumes.iter().map(volume_line).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&Report { resources, volumes })?
            );
        }
        Output::Text => {
            for r in &resources {
                println!("{r}");
            }
            for v in &app.volumes {
                println!(
                    "volume {}/{} {} {} {}",
                    v.namespace,
                    v.pvc,
                    v.storage_class.as_deref().unwrap_or("-"),
                    v.size.as_deref().unwrap_or("-"),
                    v.volume_mode
                );
            }
            for m in &app.missing {
                eprintln!("warning: Helm manifest names {m}, which does not exist");
            }
        }
    }
    Ok(())
}

fn volume_line(v: &Volume) -> VolumeLine<'_> {
    VolumeLine {
        namespace: &v.namespace,
        pvc: &v.pvc,
        storage_class: v.storage_class.as_deref(),
        size: v.size.as_deref(),
        volume_mode: &v.volume_mode,
        access_modes: &v.access_modes,
        volume_name: v.persistent_volume.as_ref().map(|p| p.name.as_str()),
    }
}

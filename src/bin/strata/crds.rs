//! `strata crds`: print the Target, Backup and Restore CustomResourceDefinitions.

use std::io::Write;

use anyhow::Context;

/// Arguments of `strata crds` (none: the output goes to `kubectl apply -f -`).
#[derive(clap::Args)]
pub struct Args {}

/// Print the CRDs as a multi-document YAML stream.
pub fn run(_args: Args) -> anyhow::Result<()> {
    let yaml = strata::operator::crd::crds_yaml().context("rendering the CRDs")?;
    std::io::stdout()
        .lock()
        .write_all(yaml.as_bytes())
        .context("writing the CRDs")?;
    Ok(())
}

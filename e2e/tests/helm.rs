//! The Helm chart against the real local control plane: lint and render with the default and the
//! production values, server-side dry runs of the rendered manifests, and a full life cycle
//! (install, a labelled pod mutated, upgrade, certificate renewal and CA rotation while
//! admissions flow, uninstall without leftovers).
//!
//! Run by `make test` (which starts the cluster and builds helm); skipped without
//! `TF_E2E_KUBECONFIG`. The webhook runs as a local process, reached through the chart's
//! `webhook.urlOverride`; its certificate files are copied out of the chart's Secret, as the
//! kubelet would.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tensor_fusion_e2e::helm::{Helm, JobRunner, certs_binary, chart_dir};
use tensor_fusion_e2e::{Cluster, WebhookProcess, free_port, is_shared, wait_for};

const RELEASE: &str = "tfh";
const FULLNAME: &str = "tfh-tensor-fusion";

async fn cluster() -> anyhow::Result<Option<(Cluster, Helm)>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(cluster) = Cluster::from_env().await? else {
        return Ok(None);
    };
    let helm = Helm::new(&cluster)?;
    Ok(Some((cluster, helm)))
}

fn chart() -> String {
    chart_dir().display().to_string()
}

fn production_values() -> String {
    chart_dir()
        .join("values-production.yaml")
        .display()
        .to_string()
}

/// The documents of a rendered manifest with the given kind.
/// The text of the block scalar `key: |` in a rendered YAML document (its indentation removed).
fn block_scalar(document: &str, key: &str) -> String {
    let header = format!("  {key}: |");
    document
        .lines()
        .skip_while(|line| *line != header)
        .skip(1)
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .map(|line| line.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn documents<'a>(rendered: &'a str, kind: &str) -> Vec<&'a str> {
    rendered
        .split("\n---")
        .filter(|doc| doc.lines().any(|line| line == format!("kind: {kind}")))
        .collect()
}

#[tokio::test]
async fn chart_lints_and_renders_with_default_and_production_values() -> anyhow::Result<()> {
    let Some((_cluster, helm)) = cluster().await? else {
        return Ok(());
    };
    let chart = chart();
    let production = production_values();

    for values in [None, Some(production.as_str())] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        args.extend(values.iter().flat_map(|file| ["-f", file]));
        let lint = helm.output(&args)?;
        assert!(
            lint.success,
            "helm lint {values:?}: {}{}",
            lint.stdout, lint.stderr
        );
        assert!(lint.stdout.contains("1 chart(s) linted, 0 chart(s) failed"));
        assert!(!lint.stdout.contains("[WARNING]") && !lint.stdout.contains("[ERROR]"));
    }

    let default = helm.run(&["template", RELEASE, &chart, "-n", "tf-sys"])?;
    let configurations = documents(&default, "MutatingWebhookConfiguration");
    assert_eq!(configurations.len(), 1);
    let configuration = configurations[0];
    assert!(configuration.contains("name: tfh-tensor-fusion-pod-webhook"));
    assert_eq!(
        configuration.matches("- name: ").count(),
        1,
        "one entry by default"
    );
    assert!(configuration.contains("tensor-fusion.ai/enabled: \"true\""));
    assert!(configuration.contains("failurePolicy: Fail"));
    assert!(configuration.contains("sideEffects: NoneOnDryRun"));
    assert!(
        configuration.contains(
            "service:\n        name: tfh-tensor-fusion-webhook\n        namespace: tf-sys"
        )
    );
    assert_eq!(
        documents(&default, "Job").len(),
        3,
        "prepare, publish, remove"
    );
    assert_eq!(documents(&default, "CronJob").len(), 1);
    let daemon_set = documents(&default, "DaemonSet")[0];
    for expected in [
        "- --config=/etc/tensor-fusion/agent.json",
        "- --node-name=$(NODE_NAME)",
        "fieldPath: spec.nodeName",
        "path: /run/tensor-fusion",
        "path: /opt/tensor-fusion/lib",
        "nvidia.com/gpu.present: \"true\"",
        "image: ghcr.io/tensor-fusion-rs/tensor-fusion-node-agent:0.1.0",
        "hostPID: true",
        "path: /var/lib/tensor-fusion",
        "mountPath: /var/lib/tensor-fusion",
        "path: /healthz\n              port: http",
    ] {
        assert!(daemon_set.contains(expected), "DaemonSet lacks {expected}");
    }
    // The agent labels its node (GPU model and count, hosts-shared-workers): patch on nodes.
    let agent_role = documents(&default, "ClusterRole")
        .into_iter()
        .find(|role| role.contains("name: tfh-tensor-fusion-node-agent"))
        .expect("the node agent's ClusterRole");
    assert!(
        agent_role.contains("resources: [nodes]\n    verbs: [get, list, watch, patch]")
            || agent_role.contains(
                "- nodes\n    verbs:\n      - get\n      - list\n      - watch\n      - patch"
            ),
        "{agent_role}"
    );
    assert!(!documents(&default, "Deployment")[0].contains("--progressive-migration"));

    let rendered = helm.run(&[
        "template",
        RELEASE,
        &chart,
        "-n",
        "tf-sys",
        "-f",
        &production,
    ])?;
    let deployment = documents(&rendered, "Deployment")[0];
    for expected in [
        "replicas: 2",
        "cpu: 1000m\n              memory: 1Gi",
        "cpu: 4000m\n              memory: 4Gi",
        "topologyKey: kubernetes.io/hostname",
        "path: /readyz\n              port: ops",
        "secretName: tfh-tensor-fusion-webhook-tls",
    ] {
        assert!(
            deployment.contains(expected),
            "Deployment lacks {expected:?}"
        );
    }
    assert!(documents(&rendered, "PodDisruptionBudget")[0].contains("maxUnavailable: 1"));
    assert!(deployment.contains("- --progressive-migration"));
    let configuration = documents(&rendered, "MutatingWebhookConfiguration")[0];
    let (labelled, native) = configuration
        .split_once("- name: native-pods.webhook.tensor-fusion.ai")
        .expect("the native entry");
    assert!(labelled.contains("failurePolicy: Fail") && labelled.contains("timeoutSeconds: 10"));
    for expected in [
        "failurePolicy: Ignore",
        "timeoutSeconds: 2",
        "- name: asks-for-nvidia-gpus",
        "'nvidia.com/gpu' in c.resources.limits",
    ] {
        assert!(
            native.contains(expected),
            "the native entry lacks {expected:?}"
        );
    }
    let config_map = documents(&rendered, "ConfigMap")[0];
    assert!(config_map.contains("host: <db-instance>.us-west-2.aws.greptime.cloud"));
    // The node agent's own parser reads the rendered agent.json.
    let agent_json = block_scalar(config_map, "agent.json");
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &agent_json)?;
    let agent = tensor_fusion_node_agent::AgentConfig::from_file(file.path())
        .map_err(|error| anyhow::anyhow!("{error}: {agent_json}"))?;
    assert_eq!(agent.tflops_oversell_ratio, 300.0);
    assert_eq!(agent.vram_expand_to_host_mem, 40.0);
    assert_eq!(agent.vram_expand_to_host_disk, 20.0);
    assert!(agent.nvidia_operator_progressive_migration);
    assert_eq!(agent.max_worker_per_node, 256);
    assert_eq!(agent.vram_weight, 0.7);
    assert_eq!(
        agent.state_dir,
        std::path::Path::new("/var/lib/tensor-fusion")
    );
    assert_eq!(agent.tflops_weight, 0.3);
    assert!(documents(&rendered, "StatefulSet")[0].contains("replicas: 3"));

    let typo = helm.output(&[
        "template",
        RELEASE,
        &chart,
        "--set",
        "controller.replicas=2",
    ])?;
    assert!(!typo.success);
    assert!(
        typo.stderr
            .contains("at '/controller': additional properties 'replicas' not allowed"),
        "{}",
        typo.stderr
    );

    let cert_manager = helm.run(&[
        "template",
        RELEASE,
        &chart,
        "-n",
        "tf-sys",
        "--set",
        "certManager.enabled=true",
    ])?;
    assert_eq!(documents(&cert_manager, "Certificate").len(), 2);
    assert!(documents(&cert_manager, "Job").is_empty());
    assert!(
        cert_manager.contains("cert-manager.io/inject-ca-from: tf-sys/tfh-tensor-fusion-webhook")
    );
    Ok(())
}

#[tokio::test]
async fn rendered_manifests_pass_a_server_side_dry_run() -> anyhow::Result<()> {
    let Some((cluster, helm)) = cluster().await? else {
        return Ok(());
    };
    let namespace = cluster.namespace("tf-helm-dry").await?;
    let production = production_values();
    for values in [None, Some(production.as_str())] {
        let mut args = vec!["template", RELEASE, "-n", &namespace.name];
        let chart = chart();
        args.push(&chart);
        args.extend(values.iter().flat_map(|file| ["-f", file]));
        let rendered = helm.run(&args)?;
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &rendered)?;
        let path = file.path().display().to_string();
        let applied = cluster.kubectl(&[
            "apply",
            "--dry-run=server",
            "-n",
            &namespace.name,
            "-f",
            &path,
        ])?;
        let objects = applied.lines().count();
        assert!(objects >= 20, "{values:?}: {applied}");
        assert_eq!(
            applied.matches("(server dry run)").count(),
            objects,
            "{values:?}: every object accepted:\n{applied}"
        );
    }
    Ok(())
}

/// Uninstalls the release if a test stops early, and removes the cluster-wide webhook
/// configuration, so later suites never meet a fail-closed webhook that nobody serves.
struct ReleaseGuard<'a> {
    helm: &'a Helm,
    namespace: String,
}

impl Drop for ReleaseGuard<'_> {
    fn drop(&mut self) {
        let _ = self
            .helm
            .output(&["uninstall", RELEASE, "-n", &self.namespace, "--no-hooks"]);
        let _ = Command::new("kubectl")
            .args(["delete", "mutatingwebhookconfiguration"])
            .arg(format!("{FULLNAME}-pod-webhook"))
            .arg("--ignore-not-found")
            .env(
                "KUBECONFIG",
                std::env::var_os("TF_E2E_KUBECONFIG").unwrap_or_default(),
            )
            .output();
    }
}

/// Copies the Secret's serving certificate into `dir`, key first, as the kubelet updates a
/// mounted Secret; returns the certificate PEM.
async fn copy_serving_files(secrets: &Api<Secret>, dir: &Path) -> anyhow::Result<String> {
    let secret = secrets.get(&format!("{FULLNAME}-webhook-tls")).await?;
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| String::from_utf8(data[key].0.clone());
    let (key, cert) = (text("tls.key")?, text("tls.crt")?);
    for (name, contents) in [("tls.key", &key), ("tls.crt", &cert)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(cert)
}

/// The certificate the webhook on `port` serves, as PEM (via `openssl s_client`).
/// Copies the Secret's pair to the webhook's files (as the kubelet would) and waits until the
/// webhook on `port` serves that certificate.
async fn serve_current_secret(
    secrets: &Api<Secret>,
    dir: &Path,
    port: u16,
    what: &str,
) -> anyhow::Result<()> {
    let cert = copy_serving_files(secrets, dir).await?;
    wait_for(what, Duration::from_secs(30), || {
        let matches = served_certificate(port).map(|served| served.trim() == cert.trim());
        async move { matches }
    })
    .await
}

fn served_certificate(port: u16) -> anyhow::Result<String> {
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509"
        ))
        .output()?;
    Ok(String::from_utf8(output.stdout)?)
}

fn secret_text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
        .unwrap_or_default()
}

fn bundle_of(configuration: &MutatingWebhookConfiguration) -> Vec<String> {
    configuration
        .webhooks
        .iter()
        .flatten()
        .map(|webhook| {
            String::from_utf8_lossy(
                &webhook
                    .client_config
                    .ca_bundle
                    .as_ref()
                    .map(|bundle| bundle.0.clone())
                    .unwrap_or_default(),
            )
            .into_owned()
        })
        .collect()
}

fn labelled_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": { "app": "helm", "tensor-fusion.ai/enabled": "true" },
            "annotations": {
                "tensor-fusion.ai/tflops-request": "100",
                "tensor-fusion.ai/vram-limit": "3Gi"
            }
        },
        "spec": { "containers": [{ "name": "main", "image": "registry.local/app:1" }] }
    }))
    .expect("a valid Pod")
}

/// Runs the certificate logic of the chart's renewal CronJob once more, as a local process with
/// the CronJob's arguments, `overrides` replacing flags of the same name.
fn run_renewal(
    cluster: &Cluster,
    certs: &Path,
    args: &[String],
    overrides: &[&str],
) -> anyhow::Result<String> {
    let names: Vec<&str> = overrides
        .iter()
        .filter_map(|flag| flag.split('=').next())
        .collect();
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|arg| !names.contains(&arg.split('=').next().unwrap_or("")))
        .chain(overrides.iter().copied())
        .collect();
    let output = Command::new(certs)
        .args(&args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    anyhow::ensure!(output.status.success(), "tensor-fusion-certs failed: {log}");
    Ok(log)
}

// Multi-threaded: helm runs as a blocking child process while the Job runner works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_mutate_upgrade_renew_and_uninstall_without_leftovers() -> anyhow::Result<()> {
    let Some((cluster, helm)) = cluster().await? else {
        return Ok(());
    };
    // A webhook suite run earlier leaves its registration behind, pointing at a stopped
    // process; it would reject the labelled pods here. The webhook suite registers it again.
    cluster.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "tensor-fusion-webhook",
        "--ignore-not-found",
    ])?;
    let system = cluster.namespace("tf-helm-sys").await?;
    let apps = cluster.namespace("tf-helm-apps").await?;
    let certs = certs_binary()?;
    let runner = JobRunner::start(&cluster, &system.name, &certs)?;
    let guard = ReleaseGuard {
        helm: &helm,
        namespace: system.name.clone(),
    };
    let port = free_port();
    let url = format!("webhook.urlOverride=https://127.0.0.1:{port}/mutate-v1-pod");
    let chart = chart();
    let install_args = [
        "--set",
        url.as_str(),
        "--set",
        "certificates.ipAddresses={127.0.0.1}",
        "--set",
        "certificates.validity=2h,certificates.renewBefore=30m",
        "--set",
        "certificates.caValidity=4h,certificates.caRenewBefore=1h",
        "--set-string",
        "certificates.podAnnotations.kwok\\.x-k8s\\.io/status=custom",
    ];
    let mut args = vec![
        "install",
        RELEASE,
        &chart,
        "-n",
        &system.name,
        "--timeout",
        "3m",
    ];
    args.extend(install_args);
    helm.run(&args)?;
    assert_eq!(
        runner.runs(),
        (2, 0),
        "prepare and publish Jobs ran and succeeded"
    );

    // The node agent's service account may do what the agent does, and no more on nodes.
    let agent = format!(
        "system:serviceaccount:{}:{FULLNAME}-node-agent",
        system.name
    );
    for (verb, resource, allowed) in [
        ("patch", "nodes", "yes"),
        ("patch", "nodes/status", "yes"),
        ("watch", "pods", "yes"),
        ("patch", "pods", "yes"),
        ("create", "events", "yes"),
        ("delete", "nodes", "no"),
        ("delete", "pods", "no"),
    ] {
        let answer = cluster.kubectl_output(&["auth", "can-i", verb, resource, "--as", &agent])?;
        assert_eq!(answer.trim(), allowed, "{agent} {verb} {resource}");
    }

    // The Secret exists and the configuration trusts its CA.
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), &system.name);
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    let configuration_name = format!("{FULLNAME}-pod-webhook");
    let secret = secrets.get(&format!("{FULLNAME}-webhook-tls")).await?;
    let first_ca = secret_text(&secret, "ca.crt");
    assert_eq!(
        bundle_of(&configurations.get(&configuration_name).await?),
        vec![secret_text(&secret, "ca-bundle.crt")]
    );
    assert_eq!(
        secret_text(&secret, "ca-bundle.crt").trim(),
        first_ca.trim()
    );

    // A webhook process with the Secret's files serves the chart's configuration.
    let files = tempfile::tempdir()?;
    copy_serving_files(&secrets, files.path()).await?;
    let _webhook = WebhookProcess::start(&cluster, files.path(), port).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &apps.name);
    wait_for(
        "the API server to call the chart's webhook",
        Duration::from_secs(60),
        || async {
            Ok(pods
                .create(&PostParams::default(), &labelled_pod("installed"))
                .await
                .is_ok())
        },
    )
    .await?;
    let pod = pods.get("installed").await?;
    assert!(is_shared(&pod), "the labelled pod was mutated");

    // Upgrade: the hooks find valid material and change nothing; the bundle survives.
    let secret_version = secret.metadata.resource_version.clone();
    let mut args = vec![
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        &system.name,
        "--timeout",
        "3m",
    ];
    args.extend(install_args);
    args.extend(["--set", "controller.replicaCount=2"]);
    helm.run(&args)?;
    assert_eq!(runner.runs(), (4, 0));
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &system.name);
    let deployment = deployments.get(&format!("{FULLNAME}-webhook")).await?;
    assert_eq!(deployment.spec.and_then(|spec| spec.replicas), Some(2));
    let secret = secrets.get(&format!("{FULLNAME}-webhook-tls")).await?;
    assert_eq!(secret.metadata.resource_version, secret_version);
    assert_eq!(
        bundle_of(&configurations.get(&configuration_name).await?),
        vec![secret_text(&secret, "ca-bundle.crt")]
    );
    let pod = pods
        .create(&PostParams::default(), &labelled_pod("upgraded"))
        .await?;
    assert!(is_shared(&pod));

    // Renewal, with admissions flowing the whole time.
    let cron_jobs: Api<CronJob> = Api::namespaced(cluster.client.clone(), &system.name);
    let cron_job = cron_jobs.get(&format!("{FULLNAME}-certs-renew")).await?;
    let renew_args = cron_job
        .spec
        .and_then(|spec| spec.job_template.spec)
        .and_then(|spec| spec.template.spec)
        .and_then(|spec| spec.containers.into_iter().next())
        .and_then(|container| container.args)
        .unwrap_or_default();
    let running = Arc::new(AtomicBool::new(true));
    let (admitted, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let writer = {
        let (pods, running, admitted, failed) = (
            pods.clone(),
            running.clone(),
            admitted.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let dry_run = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            while running.load(Ordering::Relaxed) {
                match pods.create(&dry_run, &labelled_pod("renewal")).await {
                    Ok(pod) if is_shared(&pod) => admitted.fetch_add(1, Ordering::Relaxed),
                    Ok(_) | Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // The Job's own arguments: valid material, nothing written.
    run_renewal(&cluster, &certs, &renew_args, &[])?;
    let secret = secrets.get(&format!("{FULLNAME}-webhook-tls")).await?;
    assert_eq!(secret.metadata.resource_version, secret_version);

    // A renew-before window longer than what is left (2h): a new serving certificate, same CA.
    let log = run_renewal(
        &cluster,
        &certs,
        &renew_args,
        &["--validity=3h", "--renew-before=150m"],
    )?;
    assert!(
        log.contains("new serving certificate: serving certificate expires at"),
        "{log}"
    );
    let renewed = secrets.get(&format!("{FULLNAME}-webhook-tls")).await?;
    assert_eq!(secret_text(&renewed, "ca.crt"), first_ca);
    assert_ne!(
        secret_text(&renewed, "tls.crt"),
        secret_text(&secret, "tls.crt")
    );
    serve_current_secret(
        &secrets,
        files.path(),
        port,
        "the webhook to serve the renewed certificate",
    )
    .await?;

    // The CA inside its window: a new CA; the bundle trusts old and new until the old expires.
    let log = run_renewal(
        &cluster,
        &certs,
        &renew_args,
        &[
            "--validity=3h",
            "--renew-before=150m",
            "--ca-validity=6h",
            "--ca-renew-before=5h",
        ],
    )?;
    assert!(log.contains("new CA: CA expires at"), "{log}");
    let rotated = secrets.get(&format!("{FULLNAME}-webhook-tls")).await?;
    let new_ca = secret_text(&rotated, "ca.crt");
    assert_ne!(new_ca, first_ca);
    let bundle = bundle_of(&configurations.get(&configuration_name).await?);
    assert_eq!(
        bundle,
        vec![format!("{}\n{}\n", new_ca.trim(), first_ca.trim())]
    );
    // The kubelet takes up to a minute to update a mounted Secret; here the files change once
    // the API server has admitted pods again after the bundle changed.
    let before = admitted.load(Ordering::Relaxed);
    wait_for(
        "admissions after the bundle change",
        Duration::from_secs(30),
        || {
            let now = admitted.load(Ordering::Relaxed);
            async move { Ok(now >= before + 20) }
        },
    )
    .await?;
    serve_current_secret(
        &secrets,
        files.path(),
        port,
        "the webhook to serve the new CA's certificate",
    )
    .await?;
    let before = admitted.load(Ordering::Relaxed);
    wait_for(
        "admissions with the new CA",
        Duration::from_secs(30),
        || {
            let now = admitted.load(Ordering::Relaxed);
            async move { Ok(now >= before + 20) }
        },
    )
    .await?;
    running.store(false, Ordering::Relaxed);
    writer.await?;
    let (admitted, failed) = (
        admitted.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed, 0,
        "no admission failed through renewal and CA rotation ({admitted} ok)"
    );

    // Uninstall: the pre-delete Job removes the Secret, Helm the rest; nothing stays behind.
    pods.delete_collection(&Default::default(), &Default::default())
        .await?;
    helm.run(&[
        "uninstall",
        RELEASE,
        "-n",
        &system.name,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    assert_eq!(runner.runs(), (5, 0), "the remove Job ran");
    drop(guard);
    let kinds = "all,configmaps,secrets,serviceaccounts,roles,rolebindings,\
                 poddisruptionbudgets,cronjobs,jobs";
    let leftovers = || -> anyhow::Result<Vec<String>> {
        let namespaced = cluster.kubectl(&["get", kinds, "-n", &system.name, "-o", "name"])?;
        let cluster_wide = cluster.kubectl(&[
            "get",
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations",
            "-o",
            "name",
        ])?;
        Ok(namespaced
            .lines()
            .filter(|name| {
                !matches!(
                    *name,
                    "configmap/kube-root-ca.crt" | "serviceaccount/default"
                )
            })
            .chain(cluster_wide.lines().filter(|name| name.contains(FULLNAME)))
            .map(str::to_owned)
            .collect())
    };
    let mut last = Vec::new();
    let waited = wait_for(
        "the release's objects to be gone",
        Duration::from_secs(60),
        || {
            let left = leftovers();
            let done = left.as_ref().is_ok_and(Vec::is_empty);
            if let Ok(left) = left {
                last = left;
            }
            async move { Ok(done) }
        },
    )
    .await;
    assert!(waited.is_ok(), "objects left after uninstall: {last:?}");
    Ok(())
}

//! Per-object authorization of a commit: which objects a change touches, and
//! whether its signer may touch each of them.
//!
//! The rules (issue 14, "Trust, per commit"):
//! - a tenant's workloads (its VMs and vm-groups, its networks and security
//!   groups, and affinities whose every VM is the tenant's) may be changed by
//!   the keys of that tenant's `admin` and `operator` members;
//! - everything else (a tenant itself, its quota, budget and members; sites
//!   with their racks, nodes, pools and bonds; node classes, SLA profiles,
//!   images, affinities across tenants, protection plans, the files of the
//!   spec root that are not specs such as `policies/` and kernel images, the
//!   `reconcile` block, and any top-level kind this code does not know) only
//!   by platform keys.
//!
//! The keys and roles come from the *authority*: the model of the last
//! applied commit, never from the commits being judged, so a member cannot
//! add themselves or raise their role in the commit that uses it. Without an
//! authority (nothing applied yet) only platform keys may sign.
//!
//! Objects are compared by their compiled form (the model's JSON), not by the
//! text that declares them: reformatting, reordering, comments and moving an
//! object to another file are not changes, and a change spelt differently
//! (`"4GiB"` vs `"4096MiB"`) is not one either. What the compiler derives from
//! other objects is left out of the comparison (a tenant's `usage`, the VMs an
//! affinity or a protection plan matches), so adding a VM is a change to that
//! VM only. Files of the spec root that are not specs (`policies/*.rego`,
//! kernels, initrds, …) have no compiled form and are compared by content.
//!
//! A merge commit's own change is what differs from *every* parent (see
//! [`authorize_merge`]): taking one side of a merge is explained by that
//! side's commits, which are judged on their own.

use std::collections::{BTreeMap, BTreeSet};

use compiler::Model;
use compiler::spec::Role;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sshsig::{AllowedSigners, fingerprint};

/// One side of a change: a commit's compiled model and its other files.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The model's JSON (`serde_json::to_value(&model)`).
    pub model: Value,
    /// Files of the spec root that are not spec files (`policies/x.rego`,
    /// `images/vmlinuz`), path → content id (a git blob id or a hash).
    pub files: BTreeMap<String, String>,
}

impl Snapshot {
    /// A snapshot of a compiled model and the spec root's other files.
    pub fn new(model: &Model, files: BTreeMap<String, String>) -> Snapshot {
        Snapshot {
            model: serde_json::to_value(model).unwrap_or(Value::Null),
            files,
        }
    }
}

/// Who signed, as the authority sees the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Signer {
    /// A platform key (the controller's trusted keys): may change anything.
    Platform {
        /// `SHA256:…`.
        fingerprint: String,
        /// Principals of the trusted-keys line.
        principals: Vec<String>,
    },
    /// A member key of the authority.
    Member {
        /// `SHA256:…`.
        fingerprint: String,
        /// Every membership with that key.
        memberships: Vec<Membership>,
    },
    /// Neither a platform key nor a member key of the authority.
    Unknown {
        /// `SHA256:…`.
        fingerprint: String,
    },
}

impl Signer {
    /// `SHA256:…` of the key.
    pub fn fingerprint(&self) -> &str {
        match self {
            Signer::Platform { fingerprint, .. }
            | Signer::Member { fingerprint, .. }
            | Signer::Unknown { fingerprint } => fingerprint,
        }
    }

    /// `platform key alice@example.com (SHA256:…)`,
    /// `bob@example.com, operator of tenant finance (SHA256:…)`.
    pub fn describe(&self) -> String {
        match self {
            Signer::Platform {
                fingerprint,
                principals,
            } => format!("platform key {} ({fingerprint})", principals.join(", ")),
            Signer::Member {
                fingerprint,
                memberships,
            } => {
                let m: Vec<String> = memberships
                    .iter()
                    .map(|m| format!("{}, {} of tenant {}", m.email, m.role, m.tenant))
                    .collect();
                format!("{} ({fingerprint})", m.join("; "))
            }
            Signer::Unknown { fingerprint } => format!("unknown key {fingerprint}"),
        }
    }
}

/// A member entry of the authority that carries the signer's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Membership {
    /// Tenant.
    pub tenant: String,
    /// E-mail.
    pub email: String,
    /// `admin`, `operator`, `viewer`.
    pub role: String,
}

/// Resolves a key (its SSH wire blob) against the platform keys and the
/// authority's members. A platform key wins over a membership.
pub fn identify(key_blob: &[u8], platform: &AllowedSigners, authority: Option<&Model>) -> Signer {
    let fp = fingerprint(key_blob);
    if let Some(s) = platform
        .signers
        .iter()
        .find(|s| !s.cert_authority && s.key == key_blob)
    {
        return Signer::Platform {
            fingerprint: fp,
            principals: s.principals.clone(),
        };
    }
    let memberships: Vec<Membership> = authority
        .into_iter()
        .flat_map(|m| &m.tenants)
        .flat_map(|t| t.members.iter().map(move |m| (t, m)))
        .filter(|(_, m)| m.key.as_deref().and_then(key_blob_of) == Some(key_blob.to_vec()))
        .map(|(t, m)| Membership {
            tenant: t.name.clone(),
            email: m.email.clone(),
            role: role_word(m.role).to_owned(),
        })
        .collect();
    if memberships.is_empty() {
        Signer::Unknown { fingerprint: fp }
    } else {
        Signer::Member {
            fingerprint: fp,
            memberships,
        }
    }
}

fn key_blob_of(text: &str) -> Option<Vec<u8>> {
    compiler::sshkey::parse(text).ok().map(|k| k.blob)
}

fn role_word(r: Role) -> &'static str {
    match r {
        Role::Admin => "admin",
        Role::Operator => "operator",
        Role::Viewer => "viewer",
    }
}

/// Who may change an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    /// The tenant's admin and operator members (and platform keys).
    Tenant(String),
    /// Platform keys only.
    Platform,
}

/// An object as the comparison sees it.
#[derive(Debug, Clone)]
struct Object {
    owner: Owner,
    value: Value,
    /// What the platform rule calls it (`a tenant's quota`).
    what: &'static str,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// In the new commit only.
    Added,
    /// In both, different.
    Changed,
    /// In the old commit only.
    Removed,
}

impl Action {
    fn word(self) -> &'static str {
        match self {
            Action::Added => "added",
            Action::Changed => "changed",
            Action::Removed => "removed",
        }
    }
}

/// An object the signer may not change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Refusal {
    /// Kind as the spec language spells it (`vm`, `quota`, `member`, `file`, …).
    pub kind: String,
    /// Name (`web-1`, `finance/bob@example.com`, `policies/budget.rego`).
    pub name: String,
    /// What the commit does to it.
    pub action: Action,
    /// `file:line:col` in the new commit, when known.
    pub location: Option<String>,
    /// The rule broken.
    pub rule: String,
    /// Who may make this change.
    pub may_change: String,
}

impl Refusal {
    /// One line: `vm web-1 (workloads.kdl:3:1) changed: RULE; may be changed by WHO`.
    pub fn line(&self) -> String {
        let at = self
            .location
            .as_ref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        format!(
            "{} {}{at} {}: {}; {}",
            self.kind,
            self.name,
            self.action.word(),
            self.rule,
            self.may_change
        )
    }
}

/// The result for one commit (or one pull request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Verdict {
    /// Who signed.
    pub signer: Signer,
    /// Objects changed, as `KIND NAME`.
    pub changed: Vec<String>,
    /// Objects the signer may not change; empty: allowed.
    pub refusals: Vec<Refusal>,
}

impl Verdict {
    /// Whether the change may go in.
    pub fn allowed(&self) -> bool {
        self.refusals.is_empty()
    }
}

/// Where an object of the new commit is declared: `(kind, name)` →
/// `file:line:col`. Kinds are the spec language's (`vm`, `tenant`, …); a
/// network or member is asked as `tenant` with its tenant's name.
pub type Locate<'a> = &'a dyn Fn(&str, &str) -> Option<String>;

/// A locator that knows nothing.
pub fn nowhere(_: &str, _: &str) -> Option<String> {
    None
}

/// A locator over a compilation's spans.
pub fn locator<'a>(
    sources: &'a compiler::Sources,
    spans: &'a compiler::check::SpanIndex,
) -> impl Fn(&str, &str) -> Option<String> + 'a {
    move |kind: &str, name: &str| {
        let k = crate::eval::KINDS.iter().find(|k| **k == kind)?;
        let span = spans.get(k, name)?;
        let lc = compiler::diag::line_col(sources.text(span.file), span.start);
        Some(format!(
            "{}:{}:{}",
            sources.path(span.file),
            lc.line,
            lc.column
        ))
    }
}

/// Judges the change `before` → `after` signed by `signer` (see
/// [`identify`]), with the keys and roles of `authority` (the last applied
/// commit's model; `None` when nothing was applied yet).
pub fn authorize(
    authority: Option<&Model>,
    signer: &Signer,
    before: &Snapshot,
    after: &Snapshot,
    locate: Locate<'_>,
) -> Verdict {
    // Files matter when the cluster uses them: policies, and the kernels and
    // initrds images name (on either side). A README or a CI file is not
    // judged.
    let used: BTreeSet<String> = [before, after]
        .iter()
        .flat_map(|s| list(s.model.get("images").unwrap_or(&Value::Null)))
        .flat_map(|i| [i.get("kernel"), i.get("initrd")])
        .flatten()
        .filter_map(|p| p.as_str().map(|p| p.trim_start_matches("./").to_owned()))
        .collect();
    let old = objects(before, &used);
    let new = objects(after, &used);
    let keys: BTreeSet<&(String, String)> = old.keys().chain(new.keys()).collect();
    let mut changed = vec![];
    let mut refusals = vec![];
    for key in keys {
        let (o, n) = (old.get(key), new.get(key));
        let action = match (o, n) {
            (Some(a), Some(b)) if a.value == b.value => continue,
            (Some(_), Some(_)) => Action::Changed,
            (None, Some(_)) => Action::Added,
            (Some(_), None) => Action::Removed,
            (None, None) => continue,
        };
        let (kind, name) = key;
        changed.push(format!("{kind} {name}"));
        // Every owner the object has on either side must allow it: a VM
        // moved from tenant A to B needs rights in both.
        let mut owners: Vec<&Object> = o.into_iter().chain(n).collect();
        owners.dedup_by(|a, b| a.owner == b.owner);
        for obj in owners {
            if let Some((rule, may_change)) = forbidden(authority, signer, obj) {
                let (lk, ln) = locate_as(kind, name);
                refusals.push(Refusal {
                    kind: kind.clone(),
                    name: name.clone(),
                    action,
                    location: n.and_then(|_| locate(lk, ln)),
                    rule,
                    may_change,
                });
                break;
            }
        }
    }
    Verdict {
        signer: signer.clone(),
        changed,
        refusals,
    }
}

/// A merge's own change: only what differs from every parent is the
/// merger's; taking one side is explained by that side's commits (judged on
/// their own). `parents[0]` is the first parent.
pub fn authorize_merge(
    authority: Option<&Model>,
    signer: &Signer,
    parents: &[Snapshot],
    merge: &Snapshot,
    locate: Locate<'_>,
) -> Verdict {
    let mut verdicts = parents
        .iter()
        .map(|p| authorize(authority, signer, p, merge, locate));
    let Some(mut first) = verdicts.next() else {
        return authorize(authority, signer, &Snapshot::default(), merge, locate);
    };
    for v in verdicts {
        let other: BTreeSet<(String, String)> = v
            .refusals
            .iter()
            .map(|r| (r.kind.clone(), r.name.clone()))
            .collect();
        first
            .refusals
            .retain(|r| other.contains(&(r.kind.clone(), r.name.clone())));
    }
    first
}

/// The kind and name the locator is asked for (sub-objects of a tenant are
/// found at their tenant).
fn locate_as<'k>(kind: &'k str, name: &'k str) -> (&'k str, &'k str) {
    match kind {
        "network" | "security-group" | "member" | "quota" | "budget" => {
            ("tenant", name.split('/').next().unwrap_or(name))
        }
        "node" | "pool" | "bond" => ("site", name.split('/').next().unwrap_or(name)),
        _ => (kind, name),
    }
}

/// `Some((rule, who may))` when `signer` may not change `obj`.
fn forbidden(authority: Option<&Model>, signer: &Signer, obj: &Object) -> Option<(String, String)> {
    let memberships = match signer {
        Signer::Platform { .. } => return None,
        Signer::Member { memberships, .. } => &memberships[..],
        Signer::Unknown { .. } => &[][..],
    };
    let platform_only = "may be changed only by a platform key (the controller's --trusted-keys)";
    match &obj.owner {
        Owner::Platform => Some((
            format!("{} is platform-only: no member key may change it", obj.what),
            platform_only.to_owned(),
        )),
        Owner::Tenant(t) => {
            let mine = memberships.iter().find(|m| &m.tenant == t);
            match mine {
                Some(m) if m.role == "admin" || m.role == "operator" => None,
                Some(m) => Some((
                    format!(
                        "a tenant's workloads may be changed by its admin and operator members; {} is a {} of tenant {t}",
                        m.email, m.role
                    ),
                    may_change_tenant(authority, t),
                )),
                None => Some((
                    format!(
                        "a tenant's workloads may be changed only by its own admin and operator members; the signer is not a member of tenant {t}"
                    ),
                    may_change_tenant(authority, t),
                )),
            }
        }
    }
}

fn may_change_tenant(authority: Option<&Model>, tenant: &str) -> String {
    let who: Vec<String> = authority
        .and_then(|m| m.tenants.iter().find(|t| t.name == tenant))
        .map(|t| {
            t.members
                .iter()
                .filter(|m| m.key.is_some() && matches!(m.role, Role::Admin | Role::Operator))
                .map(|m| format!("{} ({})", m.email, role_word(m.role)))
                .collect()
        })
        .unwrap_or_default();
    if who.is_empty() {
        format!(
            "may be changed by a platform key, or by the key of an admin or operator member of tenant {tenant} (it has none with a key in the applied commit)"
        )
    } else {
        format!(
            "may be changed by a platform key or by {} of tenant {tenant}",
            who.join(", ")
        )
    }
}

/// Every object of a snapshot, by (kind, name).
fn objects(s: &Snapshot, used: &BTreeSet<String>) -> BTreeMap<(String, String), Object> {
    let mut out = BTreeMap::new();
    let mut put = |kind: &str, name: String, owner: Owner, value: Value, what: &'static str| {
        out.insert((kind.to_owned(), name), Object { owner, value, what });
    };
    let model = s.model.as_object().cloned().unwrap_or_default();
    // Which tenant each VM belongs to, for affinities.
    let vm_tenant: BTreeMap<&str, &str> = model
        .get("vms")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v.get("name")?.as_str()?, v.get("tenant")?.as_str()?)))
        .collect();
    for (key, value) in &model {
        match key.as_str() {
            "format_version" => {}
            "vms" | "vm_groups" => {
                let kind = if key == "vms" { "vm" } else { "vm-group" };
                for v in list(value) {
                    let owner = Owner::Tenant(text(v, "tenant"));
                    put(kind, text(v, "name"), owner, v.clone(), "a workload");
                }
            }
            "tenants" => {
                for t in list(value) {
                    let tenant = text(t, "name");
                    let mut rest = t.clone();
                    if let Some(r) = rest.as_object_mut() {
                        for k in [
                            "usage",
                            "networks",
                            "security_groups",
                            "members",
                            "quota",
                            "budget",
                        ] {
                            r.remove(k);
                        }
                    }
                    put("tenant", tenant.clone(), Owner::Platform, rest, "a tenant");
                    for (field, kind, what) in [
                        ("quota", "quota", "a tenant's quota"),
                        ("budget", "budget", "a tenant's budget"),
                    ] {
                        if let Some(v) = t.get(field).filter(|v| !v.is_null()) {
                            put(kind, tenant.clone(), Owner::Platform, v.clone(), what);
                        }
                    }
                    for m in t.get("members").map(list).unwrap_or_default() {
                        let name = format!("{tenant}/{}", text(m, "email"));
                        put(
                            "member",
                            name,
                            Owner::Platform,
                            m.clone(),
                            "a tenant's members",
                        );
                    }
                    for (field, kind) in [
                        ("networks", "network"),
                        ("security_groups", "security-group"),
                    ] {
                        for n in t.get(field).map(list).unwrap_or_default() {
                            let name = format!("{tenant}/{}", text(n, "name"));
                            put(
                                kind,
                                name,
                                Owner::Tenant(tenant.clone()),
                                n.clone(),
                                "a workload",
                            );
                        }
                    }
                }
            }
            "affinities" => {
                for a in list(value) {
                    let owner = affinity_owner(a, &vm_tenant);
                    let mut v = a.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("vms");
                    }
                    put(
                        "affinity",
                        text(a, "name"),
                        owner,
                        v,
                        "an affinity across tenants",
                    );
                }
            }
            "protection_plans" => {
                for p in list(value) {
                    let mut v = p.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("vms");
                    }
                    put(
                        "protection-plan",
                        text(p, "name"),
                        Owner::Platform,
                        v,
                        "a protection plan",
                    );
                }
            }
            "sites" => {
                for site in list(value) {
                    let name = text(site, "name");
                    let mut rest = site.clone();
                    if let Some(r) = rest.as_object_mut() {
                        for (field, kind, what) in [
                            ("nodes", "node", "a node"),
                            ("pools", "pool", "a pool"),
                            ("bonds", "bond", "a bond"),
                        ] {
                            for x in r.remove(field).as_ref().map(list).unwrap_or_default() {
                                let n = format!("{name}/{}", text(x, "name"));
                                put(kind, n, Owner::Platform, x.clone(), what);
                            }
                        }
                    }
                    put("site", name, Owner::Platform, rest, "a site");
                }
            }
            other => {
                let kind = singular(other);
                match value.as_array() {
                    Some(items) if items.iter().all(|i| i.get("name").is_some()) => {
                        for i in items {
                            put(
                                &kind,
                                text(i, "name"),
                                Owner::Platform,
                                i.clone(),
                                platform_what(&kind),
                            );
                        }
                    }
                    _ => put(
                        &kind,
                        String::new(),
                        Owner::Platform,
                        value.clone(),
                        platform_what(&kind),
                    ),
                }
            }
        }
    }
    for (path, id) in &s.files {
        let (kind, what) = if path.starts_with("policies/") {
            ("policy-file", "a policies file")
        } else if used.contains(path) {
            ("file", "a kernel or initrd file of an image")
        } else {
            continue;
        };
        put(
            kind,
            path.clone(),
            Owner::Platform,
            Value::String(id.clone()),
            what,
        );
    }
    out
}

fn platform_what(kind: &str) -> &'static str {
    match kind {
        "node-class" => "a node class",
        "sla-profile" => "an SLA profile",
        "image" => "an image",
        "reconcile" => "the reconcile block",
        _ => "this kind of object",
    }
}

/// `node_classes` → `node-class`, `reconcile` → `reconcile`.
fn singular(key: &str) -> String {
    let k = key.replace('_', "-");
    if let Some(s) = k.strip_suffix("ies") {
        format!("{s}y")
    } else if let Some(s) = k.strip_suffix("sses") {
        format!("{s}ss")
    } else if let Some(s) = k.strip_suffix('s') {
        s.to_owned()
    } else {
        k
    }
}

/// An affinity is a tenant's when its selector names the tenant, or when
/// every VM it matches is that tenant's; otherwise it spans tenants.
fn affinity_owner(a: &Value, vm_tenant: &BTreeMap<&str, &str>) -> Owner {
    if let Some(t) = a
        .get("select")
        .and_then(|s| s.get("tenant"))
        .and_then(Value::as_str)
    {
        return Owner::Tenant(t.to_owned());
    }
    let tenants: BTreeSet<&str> = a
        .get("vms")
        .map(list)
        .unwrap_or_default()
        .iter()
        .filter_map(|v| vm_tenant.get(v.as_str()?).copied())
        .collect();
    match tenants.into_iter().collect::<Vec<_>>()[..] {
        [t] => Owner::Tenant(t.to_owned()),
        _ => Owner::Platform,
    }
}

fn list(v: &Value) -> Vec<&Value> {
    v.as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

fn text(v: &Value, field: &str) -> String {
    v.get(field)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// The files of a spec root in a git commit that are not specs, path (relative
/// to the spec root) → blob id: what [`Snapshot::files`] holds.
pub fn tree_files(
    repo: &git2::Repository,
    commit: git2::Oid,
    subdir: &std::path::Path,
) -> Result<BTreeMap<String, String>, git2::Error> {
    let mut tree = repo.find_commit(commit)?.tree()?;
    if !subdir.as_os_str().is_empty() {
        match tree.get_path(subdir) {
            Ok(e) => tree = e.to_object(repo)?.peel_to_tree()?,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e),
        }
    }
    let mut out = BTreeMap::new();
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(git2::ObjectType::Blob)
            && let Ok(name) = entry.name()
            && !name.ends_with(".kdl")
        {
            out.insert(format!("{dir}{name}"), entry.id().to_string());
        }
        git2::TreeWalkResult::Ok
    })?;
    Ok(out)
}

/// The text of refusals for an event: each object and its rule.
pub fn refusal_text(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(Refusal::line)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;

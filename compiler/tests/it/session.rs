//! Incremental compilation (issue 24, item 6): a `Session` that re-lowers only
//! the changed files gives the full compile's model and diagnostics, byte for
//! byte, over generated histories of commits (edits, syntax errors, files
//! added, removed and renamed, names declared twice across files).

use std::sync::Arc;

use compiler::Sources;
use compiler::generate::{GenConfig, generate};
use compiler::session::Session;

use crate::Rng;

/// One commit: a random edit of the repository.
fn edit(files: &mut Vec<(String, String)>, rng: &mut Rng, step: usize) -> &'static str {
    let f = rng.below(files.len());
    match rng.below(9) {
        0 | 1 => {
            // Change one number somewhere in a file (cpu, memory, replicas, …).
            let text = &files[f].1;
            let digits: Vec<usize> = text
                .char_indices()
                .filter(|(_, c)| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            if let Some(&at) = digits.get(rng.below(digits.len())) {
                let d = (text.as_bytes()[at] - b'0' + 1) % 10;
                let mut t = text.clone();
                t.replace_range(at..=at, &d.to_string());
                files[f].1 = t;
            }
            "number"
        }
        2 => {
            // Delete a line (often a syntax or shape error).
            let lines: Vec<&str> = files[f].1.lines().collect();
            let at = rng.below(lines.len());
            let t: Vec<&str> = lines
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != at)
                .map(|(_, l)| *l)
                .collect();
            files[f].1 = t.join("\n") + "\n";
            "delete line"
        }
        3 | 4 => {
            // Add a VM to a file.
            files[f].1.push_str(&format!(
                "vm \"new{step}\" tenant=\"t{}\" site=\"site-0\" {{\n    cpu 2\n    memory \"4GiB\"\n    image \"tiny\"\n}}\n",
                rng.below(2)
            ));
            "add vm"
        }
        5 => {
            // A new file, sometimes declaring a name another file declares.
            let name = if rng.below(2) == 0 {
                "vm1".to_owned()
            } else {
                format!("extra{step}")
            };
            files.push((
                format!("more/f{step}.kdl"),
                format!("vm \"{name}\" tenant=\"t0\" site=\"site-0\" {{\n    cpu 1\n    memory \"2GiB\"\n    image \"tiny\"\n}}\n"),
            ));
            "add file"
        }
        6 if files.len() > 2 => {
            files.remove(f);
            "remove file"
        }
        7 => {
            // Rename a file: it and every file after it move in path order.
            let (path, text) = files.remove(f);
            files.push((format!("a-renamed/{step}-{}", path.replace('/', "-")), text));
            "rename file"
        }
        _ => "no change",
    }
}

fn assert_same(
    session: &mut Session,
    files: &[(String, String)],
    what: &str,
) -> compiler::session::Reuse {
    let sources = Sources::from_files(files.to_vec());
    let full = compiler::compile(&sources);
    let (incremental, reuse) = session.compile(&sources);
    assert_eq!(
        compiler::model_json(&incremental.model),
        compiler::model_json(&full.model),
        "model after {what}"
    );
    assert_eq!(
        incremental.diagnostics, full.diagnostics,
        "diagnostics after {what}"
    );
    assert!(incremental.spans == full.spans, "span index after {what}");
    assert_eq!(
        reuse.reused + reuse.lowered,
        sources.len(),
        "every file is reused or lowered"
    );
    reuse
}

#[test]
fn a_session_compiles_every_commit_of_a_history_as_a_full_compile_does() {
    let mut edits = std::collections::BTreeMap::new();
    let mut errors = 0;
    for seed in 1..=4u64 {
        let mut files = generate(&GenConfig {
            nodes: 40,
            vms: 200,
            seed,
        });
        let mut rng = Rng(0x9E37_79B9 ^ seed);
        let mut session = Session::new();
        let first = assert_same(&mut session, &files, "the first compile");
        assert_eq!(first.reused, 0);
        for step in 0..40 {
            let before = files.clone();
            let what = edit(&mut files, &mut rng, step);
            *edits.entry(what).or_insert(0) += 1;
            let reuse = assert_same(&mut session, &files, what);
            // An edit in place re-lowers at most the file it touched.
            if matches!(what, "number" | "delete line" | "add vm" | "no change") {
                let changed = before.iter().zip(&files).filter(|(a, b)| a != b).count();
                assert_eq!(
                    reuse.lowered, changed,
                    "{what}: only the changed file is lowered"
                );
            }
            let sources = Sources::from_files(files.clone());
            errors += usize::from(compiler::compile(&sources).has_errors());
        }
    }
    // The histories exercise what they claim to.
    for what in [
        "number",
        "delete line",
        "add vm",
        "add file",
        "remove file",
        "rename file",
    ] {
        assert!(
            edits.get(what).copied().unwrap_or(0) > 0,
            "no {what} edit: {edits:?}"
        );
    }
    assert!(errors > 0, "no commit of the histories had an error");
}

/// One commit that changes VMs' resources: the `cpu` or `memory` line of a
/// random VM or vm-group of a workload file, to a value that sometimes
/// crosses tenant `t0`'s quota or a site's room for reserved VMs; or, now and
/// then, something a cross-object pass reads (a tag, a network, a replica
/// count, a disk size) or a pinned address, which the patch must refuse.
fn resource_edit(files: &mut [(String, String)], rng: &mut Rng) -> &'static str {
    let workloads: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].0.starts_with("workloads/"))
        .collect();
    let f = workloads[rng.below(workloads.len())];
    let before = files[f].1.clone();
    let text = &mut files[f].1;
    let (key, what) = match rng.below(10) {
        0..=3 => ("\n    cpu ", "cpu"),
        4..=6 => ("\n    memory ", "memory"),
        7 => ("\n    tag \"tier\" ", "tag"),
        8 => ("replicas=", "replicas"),
        _ => ("\n    nic network=\"net-0\"", "pin"),
    };
    let at: Vec<usize> = text
        .match_indices(key)
        .map(|(i, _)| i + key.len())
        .collect();
    let Some(&at) = at.get(rng.below(at.len())) else {
        return "no change";
    };
    let end = at + text[at..].find(['\n', ' ']).unwrap_or(text.len() - at);
    let value = match what {
        "cpu" => [1, 2, 3, 4, 8, 16, 64, 500][rng.below(8)].to_string(),
        "memory" => format!("\"{}GiB\"", [1, 2, 4, 8, 64, 100_000][rng.below(6)]),
        "tag" => format!("\"{}\"", ["web", "db", "batch"][rng.below(3)]),
        "replicas" => (1 + rng.below(9)).to_string(),
        _ => " address=\"10.0.0.77\"".to_owned(),
    };
    if what == "pin" {
        text.insert_str(at, &value);
    } else {
        text.replace_range(at..end, &value);
    }
    if *text == before { "no change" } else { what }
}

#[test]
fn a_change_to_vms_alone_is_checked_alone_and_gives_the_whole_check() {
    let mut patched = std::collections::BTreeMap::new();
    let mut whole = std::collections::BTreeMap::new();
    for seed in 1..=3u64 {
        let mut files = generate(&GenConfig {
            nodes: 60,
            vms: 400,
            seed,
        });
        // A quota on t0 a little above what it uses, so that growing a VM
        // sometimes crosses it.
        let usage = compiler::compile(&Sources::from_files(files.clone()))
            .model
            .tenants
            .iter()
            .find(|t| t.name == "t0")
            .map(|t| t.usage.clone())
            .expect("tenant t0");
        let tenants = files
            .iter_mut()
            .find(|(p, _)| p == "tenants.kdl")
            .expect("tenants.kdl");
        tenants.1 = tenants.1.replacen(
            "tenant \"t0\" {\n",
            &format!(
                "tenant \"t0\" {{\n    quota vcpus={} memory=\"{}GiB\"\n",
                usage.vcpus + 40,
                usage.memory_bytes / (1 << 30) + 64
            ),
            1,
        );
        // The generated FT VMs with disks carry a VM's own warning: the patch
        // must report them again for the changed file, as the whole check does.
        assert!(
            compiler::compile(&Sources::from_files(files.clone()))
                .diagnostics
                .iter()
                .any(|d| d.code == "cairn::check::ft_disks_unprotected"),
            "seed {seed}: no VM's own warning to carry"
        );
        let base = files.clone();
        let mut rng = Rng(0x5EED_0000 ^ seed);
        let mut session = Session::new();
        assert_same(&mut session, &files, "the first compile");
        for step in 0..60 {
            let what = resource_edit(&mut files, &mut rng);
            let reuse = assert_same(&mut session, &files, &format!("step {step}: {what}"));
            let errors = compiler::compile(&Sources::from_files(files.clone())).has_errors();
            let key = format!("{what}{}", if errors { " (error)" } else { "" });
            match reuse.vms_rechecked {
                Some(n) => {
                    assert!(
                        n > 0 || what == "no change",
                        "{what}: a patch re-checks the changed file's VMs"
                    );
                    *patched.entry(key).or_insert(0) += 1;
                }
                None => *whole.entry(key).or_insert(0) += 1,
            }
            if errors {
                // Back to a clean repository, so that the next edits can be
                // patched again.
                files = base.clone();
                assert_same(&mut session, &files, "the reset");
            }
        }
    }
    // The patch is taken for resource changes, and refused for the rest and
    // for changes that cross a quota or a site's room.
    for what in ["cpu", "memory"] {
        assert!(
            patched.contains_key(what),
            "{what} never patched: {patched:?}"
        );
    }
    for what in ["tag", "pin", "replicas"] {
        assert!(
            !patched
                .keys()
                .any(|k| k.starts_with(what) && !k.contains("no change")),
            "{what} patched: {patched:?}"
        );
    }
    assert!(
        whole
            .keys()
            .any(|k| k.contains("(error)") && (k.starts_with("cpu") || k.starts_with("memory"))),
        "no resource change crossed a limit: {whole:?}"
    );
}

#[test]
fn an_unchanged_push_lowers_nothing_and_an_empty_root_says_so() {
    let files = generate(&GenConfig {
        nodes: 20,
        vms: 50,
        seed: 7,
    });
    let mut session = Session::new();
    assert_same(&mut session, &files, "first");
    let again = assert_same(&mut session, &files, "again");
    assert_eq!(
        (again.lowered, again.reused, again.removed),
        (0, files.len(), 0)
    );
    let gone = assert_same(&mut session, &[], "every file removed");
    assert_eq!(gone.removed, files.len());
}

/// One change to a compiled model, as a commit would make it.
fn change(
    model: &mut compiler::Model,
    rng: &mut Rng,
    step: usize,
) -> (&'static str, Option<String>) {
    let n = model.vms.len();
    let i = rng.below(n);
    let site = Some(model.vms[i].site.clone());
    let what = match rng.below(8) {
        0 | 1 => {
            let vm = Arc::make_mut(&mut model.vms[i]);
            vm.cpu = (vm.cpu % 8) + 1;
            "vm cpu"
        }
        2 => {
            Arc::make_mut(&mut model.vms[i]).memory_bytes *= 2;
            "vm memory"
        }
        3 => {
            let mut vm = compiler::model::Vm::clone(&model.vms[i]);
            vm.name = format!("zz-new{step}");
            vm.group = None;
            model.vms.push(Arc::new(vm));
            "add vm"
        }
        4 => {
            model.vms.remove(i);
            "remove vm"
        }
        5 => {
            let app = format!("app{}", rng.below(97));
            Arc::make_mut(&mut model.vms[i])
                .tags
                .insert("app".to_owned(), app);
            "vm tag"
        }
        6 => {
            let s = rng.below(model.sites.len());
            let site = &mut model.sites[s];
            site.overcommit.cpu = if site.overcommit.cpu > 2.0 { 1.0 } else { 4.0 };
            return ("site overcommit", Some(site.name.clone()));
        }
        _ => return ("no change", None),
    };
    (what, site)
}

#[test]
fn placing_site_by_site_gives_the_whole_placement_after_every_change() {
    use compiler::place::{PlaceOptions, place, placement_json};
    use compiler::session::PlaceSession;
    // 501 nodes: two sites (the generator makes one per 500 nodes).
    let files = generate(&GenConfig {
        nodes: 501,
        vms: 700,
        seed: 3,
    });
    let compiled = compiler::compile(&Sources::from_files(files));
    assert!(!compiled.has_errors(), "{:?}", compiled.diagnostics);
    let mut model = compiled.model;
    assert_eq!(model.sites.len(), 2);
    let mut previous = place(&model, &PlaceOptions::default(), None);
    let mut session = PlaceSession::new();
    let mut rng = Rng(0xC0FF_EE11);
    let mut seen = std::collections::BTreeMap::new();
    let mut reused = 0;
    let mut last_dirty: Option<String> = None;
    for step in 0..24 {
        let (what, dirty) = if step == 0 {
            ("no change", None)
        } else {
            change(&mut model, &mut rng, step)
        };
        model.vms.sort_by(|a, b| a.name.cmp(&b.name));
        let options = PlaceOptions {
            previous: Some(previous.clone()),
            ..Default::default()
        };
        let full = place(&model, &options, None);
        let (incremental, reuse) = session.place(&model, &options);
        assert_eq!(reuse.full, None, "step {step} ({what}) fell back");
        if placement_json(&incremental) != placement_json(&full) {
            panic!(
                "step {step}: {what} ({reuse:?}): {}",
                first_difference(&incremental, &full)
            );
        }
        // A site is placed again when it changed now, or changed at the last
        // push (its previous placement is then the last result, not the
        // input its memo holds); every other site is reused.
        if step > 0 {
            let placed_again: std::collections::BTreeSet<&String> =
                dirty.iter().chain(&last_dirty).collect();
            assert!(
                reuse.sites_placed <= placed_again.len(),
                "step {step}: {what} placed {reuse:?}, more than {placed_again:?}"
            );
            assert_eq!(reuse.sites_placed + reuse.sites_reused, model.sites.len());
        }
        last_dirty = dirty;
        reused += reuse.sites_reused;
        *seen.entry(what).or_insert(0) += 1;
        previous = full;
    }
    assert!(reused > 0);
    assert!(seen.len() >= 6, "{seen:?}");
}

#[test]
fn a_placement_session_falls_back_to_the_whole_placement_and_says_why() {
    use compiler::place::{PlaceOptions, place};
    use compiler::session::PlaceSession;
    let files = generate(&GenConfig {
        nodes: 20,
        vms: 60,
        seed: 5,
    });
    let mut model = compiler::compile(&Sources::from_files(files)).model;
    let mut session = PlaceSession::new();
    let (first, reuse) = session.place(&model, &PlaceOptions::default());
    assert_eq!(reuse.full.as_deref(), Some("no previous placement"));
    assert_eq!(first, place(&model, &PlaceOptions::default(), None));
    model.affinities[0].hard = true;
    model.affinities[0].kind = compiler::model::AffinityKind::Together;
    let options = PlaceOptions {
        previous: Some(first),
        ..Default::default()
    };
    let (again, reuse) = session.place(&model, &options);
    assert!(
        reuse
            .full
            .as_deref()
            .is_some_and(|w| w.contains("hard together")),
        "{reuse:?}"
    );
    assert_eq!(again, place(&model, &options, None));
}

/// The first list element that differs between two placements, shortly.
fn first_difference(a: &compiler::place::Placement, b: &compiler::place::Placement) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap(),
        serde_json::to_value(b).unwrap(),
    );
    for (key, x) in a.as_object().unwrap() {
        let y = &b[key];
        if x == y {
            continue;
        }
        if let (Some(x), Some(y)) = (x.as_array(), y.as_array()) {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                if u != v {
                    return format!("{key}[{i}]: session {u} / whole {v}");
                }
            }
            return format!("{key}: {} entries / {}", x.len(), y.len());
        }
        return format!("{key}: {x} / {y}");
    }
    "no difference".to_owned()
}

/// One commit to a generated repository's workload files, of the kinds that
/// change placement within a site: a VM resized (vCPUs, memory, a disk), its
/// SLA or app tag changed (spot or not; affinity memberships), a NIC added
/// or removed, a group's replica count changed (replicas placed under its
/// rack spread), a VM added or removed. Returns what it did.
fn placement_edit(
    files: &mut [(String, String)],
    rng: &mut Rng,
    step: usize,
    sites: usize,
) -> String {
    let workloads: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].0.starts_with("workloads/"))
        .collect();
    let f = workloads[rng.below(workloads.len())];
    let tenant = files[f]
        .0
        .trim_start_matches("workloads/")
        .trim_end_matches(".kdl")
        .to_owned();
    let text = &mut files[f].1;
    // The VM and vm-group blocks of the file: (start, end after `}\n`).
    let blocks: Vec<(usize, usize)> = text
        .match_indices("\nvm")
        .map(|(i, _)| i + 1)
        .chain(text.starts_with("vm").then_some(0))
        .filter_map(|start| {
            text[start..]
                .find("\n}\n")
                .map(|end| (start, start + end + 3))
        })
        .collect();
    let pick = |rng: &mut Rng, key: &str| -> Option<(usize, usize)> {
        let at: Vec<usize> = text
            .match_indices(key)
            .map(|(i, _)| i + key.len())
            .collect();
        let &at = at.get(rng.below(at.len()))?;
        let end = at + text[at..].find('\n').unwrap_or(text.len() - at);
        Some((at, end))
    };
    match rng.below(12) {
        0 | 1 => {
            let Some((at, end)) = pick(rng, "\n    cpu ") else {
                return "no change".to_owned();
            };
            let cpu = [1, 2, 4, 8, 16, 32][rng.below(6)];
            text.replace_range(at..end, &cpu.to_string());
            format!("cpu {cpu}")
        }
        2 => {
            let Some((at, end)) = pick(rng, "\n    memory ") else {
                return "no change".to_owned();
            };
            let mem = [2, 4, 16, 64, 200][rng.below(5)];
            text.replace_range(at..end, &format!("\"{mem}GiB\""));
            format!("memory {mem}")
        }
        3 => {
            let Some((at, end)) = pick(rng, "disk \"data\" size=") else {
                return "no change".to_owned();
            };
            let size = [10, 30, 80, 400][rng.below(4)];
            text.replace_range(at..end, &format!("\"{size}GiB\" pool=\"fast\""));
            "disk size".to_owned()
        }
        4 => {
            let Some((at, end)) = pick(rng, "\n    sla ") else {
                return "no change".to_owned();
            };
            let sla = ["\"batch\"", "\"on-demand\""][rng.below(2)];
            text.replace_range(at..end, sla);
            format!("sla {sla}")
        }
        5 => {
            let Some((at, end)) = pick(rng, "tag \"app\" ") else {
                return "no change".to_owned();
            };
            text.replace_range(at..end, &format!("\"app{}\"", rng.below(97)));
            "app tag".to_owned()
        }
        6 => {
            // A second NIC on the VM's own network, or one removed.
            let Some(&(start, end)) = blocks.get(rng.below(blocks.len())) else {
                return "no change".to_owned();
            };
            let block = text[start..end].to_owned();
            let nic = block
                .lines()
                .find(|l| l.trim_start().starts_with("nic "))
                .map(|l| format!("{l}\n"));
            let Some(nic) = nic else {
                return "no change".to_owned();
            };
            let changed = if block.matches("    nic ").count() > 1 {
                block.replacen(&nic, "", 1)
            } else {
                block.replacen(&nic, &format!("{nic}{nic}"), 1)
            };
            text.replace_range(start..end, &changed);
            "nic".to_owned()
        }
        7 => {
            let Some((at, end)) = pick(rng, " replicas=") else {
                return "no change".to_owned();
            };
            let close = text[at..end].find(' ').map_or(end, |i| at + i);
            let n = 1 + rng.below(12);
            text.replace_range(at..close, &n.to_string());
            format!("replicas {n}")
        }
        8 | 9 => {
            let site = rng.below(sites);
            let app = rng.below(97);
            let (sla, avail) = [
                ("on-demand", "none"),
                ("batch", "none"),
                ("on-demand", "ha"),
                ("gold", "ha"),
            ][rng.below(4)];
            text.push_str(&format!(
                "vm \"zz{step}\" tenant=\"{tenant}\" site=\"site-{site}\" {{\n    cpu {}\n    memory \"{}GiB\"\n    sla \"{sla}\"\n    availability \"{avail}\"\n    image \"tiny\"\n    disk \"root\" size=\"20GiB\" pool=\"fast\" from-image=#true\n    nic network=\"net-{site}\" security-groups=\"web\"\n    tag \"app\" \"app{app}\"\n    tag \"tier\" \"web\"\n}}\n",
                [1, 2, 4, 8][rng.below(4)],
                [2, 4, 8, 16][rng.below(4)],
            ));
            "add vm".to_owned()
        }
        10 => {
            let Some(&(start, end)) = blocks.get(rng.below(blocks.len())) else {
                return "no change".to_owned();
            };
            if blocks.len() < 2 {
                return "no change".to_owned();
            }
            text.replace_range(start..end, "");
            "remove vm".to_owned()
        }
        _ => "no change".to_owned(),
    }
}

/// Every site placed from the session's last result, over generated
/// histories of commits compiled from files: the session's placement is the
/// whole placement's, byte for byte, at every commit, and a commit that
/// changes one site's VMs places that site alone.
#[test]
fn placing_from_the_last_result_gives_the_whole_placement_over_commit_histories() {
    use compiler::place::{PlaceOptions, place, placement_json};
    use compiler::session::PlaceSession;
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    let (mut reused, mut placed, mut fell_back, mut hinted) = (0, 0, 0, 0);
    for seed in 1..=2u64 {
        // 501 nodes: two sites (one per 500 nodes); racks of 16.
        let mut files = generate(&GenConfig {
            nodes: 501,
            vms: 900,
            seed,
        });
        let mut compile = Session::new();
        let mut session = PlaceSession::new();
        let (first, _) = compile.compile(&Sources::from_files(files.clone()));
        assert!(!first.has_errors(), "{:?}", first.diagnostics);
        let sites = first.model.sites.len();
        assert_eq!(sites, 2);
        let mut previous = place(&first.model, &PlaceOptions::default(), None);
        let (p, _) = session.place(
            &first.model,
            &PlaceOptions {
                previous: Some(previous.clone()),
                ..Default::default()
            },
        );
        previous = p;
        // The VMs the compiles since the last placement may have changed
        // (`None`: any), for `place_next_hinted`.
        let mut hint: Option<std::collections::BTreeSet<String>> = Some(Default::default());
        let note = |compile: &Session, hint: &mut Option<std::collections::BTreeSet<String>>| match (
            compile.changed_vms(),
            hint.as_mut(),
        ) {
            (Some(names), Some(hint)) => hint.extend(names.iter().cloned()),
            _ => *hint = None,
        };
        let mut rng = Rng(0xD1FF_0000 ^ seed);
        for step in 0..36 {
            let base = files.clone();
            let what = placement_edit(&mut files, &mut rng, step, sites);
            let (c, _) = compile.compile(&Sources::from_files(files.clone()));
            note(&compile, &mut hint);
            if c.has_errors() {
                // The controller places nothing for a commit that does not
                // compile; the history goes on from the last good one.
                *seen.entry(format!("{what} (error)")).or_default() += 1;
                files = base;
                compile.compile(&Sources::from_files(files.clone()));
                note(&compile, &mut hint);
                continue;
            }
            let model = c.model;
            let options = PlaceOptions {
                previous: Some(previous.clone()),
                ..Default::default()
            };
            let full = place(&model, &options, None);
            // In turn through the comparing entry, `place_next`, and
            // `place_next_hinted` with what the compiles changed (a debug
            // build checks the hint VM by VM).
            let (incremental, reuse) = match step % 3 {
                0 => session.place(&model, &options),
                1 => {
                    let (p, r) = session.place_next(&model);
                    (p.clone(), r)
                }
                _ => {
                    if hint.as_ref().is_some_and(|h| !h.is_empty()) {
                        hinted += 1;
                    }
                    let (p, r) = session.place_next_hinted(&model, hint.as_ref());
                    (p.clone(), r)
                }
            };
            hint = Some(Default::default());
            if placement_json(&incremental) != placement_json(&full) {
                panic!(
                    "seed {seed} step {step}: {what} ({reuse:?}): {}",
                    first_difference(&incremental, &full)
                );
            }
            match &reuse.full {
                Some(_) => fell_back += 1,
                None => {
                    reused += reuse.sites_reused;
                    placed += reuse.sites_placed;
                    assert_eq!(reuse.sites_reused + reuse.sites_placed, sites);
                }
            }
            *seen.entry(what).or_default() += 1;
            previous = full;
        }
    }
    // The histories exercise what they claim to, and the session reuses.
    for what in ["add vm", "remove vm", "app tag", "nic", "disk size"] {
        assert!(seen.contains_key(what), "no {what}: {seen:?}");
    }
    for what in ["cpu", "replicas", "sla"] {
        assert!(
            seen.keys()
                .any(|k| k.starts_with(what) && !k.contains("error")),
            "no {what}: {seen:?}"
        );
    }
    assert!(reused > 0 && placed > 0, "reused {reused}, placed {placed}");
    assert!(hinted > 0, "no placement was hinted: {seen:?}");
    assert!(fell_back < 10, "fell back {fell_back} times: {seen:?}");
}

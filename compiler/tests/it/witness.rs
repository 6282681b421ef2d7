//! The site's quorum witness (`witness address= alternate=`, issues 16 and 22): the
//! preferred and the alternate address reach the model; a bad or repeated address is
//! an error naming the file and line.

fn site(witness: &str) -> String {
    format!(
        "node-class \"n\" {{\n    cpu 4\n    memory \"16GiB\"\n}}\nsite \"s\" {{\n    {witness}\n    rack \"a\" {{\n        node \"a1\" class=\"n\" address=\"127.0.0.1:1\"\n    }}\n}}\n"
    )
}

fn compiled(text: &str) -> (compiler::Model, Vec<String>) {
    crate::maintenance::compiled(vec![("a.kdl".to_owned(), text.to_owned())])
}

#[test]
fn a_preferred_and_an_alternate_witness_reach_the_model() {
    let (model, errors) = compiled(&site(
        "witness address=\"10.0.9.5:7400\" alternate=\"10.0.9.6:7400\"",
    ));
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let site = &model.sites[0];
    assert_eq!(site.witness.as_deref(), Some("10.0.9.5:7400"));
    assert_eq!(site.witness_alternate.as_deref(), Some("10.0.9.6:7400"));
    // Without `alternate=`, none; and the model's JSON leaves it out.
    let (model, errors) = compiled(&site_only_preferred());
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert_eq!(model.sites[0].witness_alternate, None);
    let json = serde_json::to_string(&model).expect("model JSON");
    assert!(!json.contains("witness_alternate"), "{json}");
}

fn site_only_preferred() -> String {
    site("witness address=\"10.0.9.5:7400\"")
}

#[test]
fn a_bad_or_repeated_alternate_is_an_error_at_its_line() {
    let (_, errors) = compiled(&site(
        "witness address=\"10.0.9.5:7400\" alternate=\"nowhere\"",
    ));
    let text = errors.join("\n");
    assert!(
        text.contains("the alternate witness address `nowhere` is not `host:port`")
            && text.contains("a.kdl:6"),
        "{text}"
    );
    let (_, errors) = compiled(&site(
        "witness address=\"10.0.9.5:7400\" alternate=\"10.0.9.5:7400\"",
    ));
    let text = errors.join("\n");
    assert!(
        text.contains("the alternate witness `10.0.9.5:7400` is the preferred one"),
        "{text}"
    );
}

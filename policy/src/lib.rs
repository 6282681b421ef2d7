//! Governance for cairn: policy-as-code over the compiled model, and the
//! verification of SSH commit signatures.
//!
//! What it does:
//! - [`set`] loads the policies of a spec root (`policies/*.rego`, their
//!   `*_test.rego` unit tests and `policies/data/*.json` data documents) from a
//!   directory or from a git revision, and reads each policy's enforcement level
//!   from its `# METADATA` comment.
//! - [`eval`] builds the one input document (the model's JSON with `placement`
//!   and `plan` beside its fields), evaluates every policy's `deny` and `warn`
//!   rules with regorus, ties every message to the object it names and to that
//!   object's spec span, and applies overrides of soft-mandatory policies.
//! - [`report`] renders a [`eval::Report`] as text, JSON, SARIF 2.1.0 or JUnit XML.
//! - [`testing`] runs the `test_*` rules of `*_test.rego` like `opa test`.
//! - [`sshsig`] verifies SSHSIG signatures (what `git commit -S` makes with
//!   `gpg.format=ssh`) against keys in git's allowed-signers format, and
//!   [`commit`] applies it to a commit of a git repository.
//!
//! What it does not: it does not compile specs or place VMs (the `compiler`
//! crate does, and hands the results in), it does not persist overrides
//! (the caller records them), and it never talks to a node.
//!
//! Architecture invariant: a policy is evaluated alone, in its own engine,
//! against the same input value; one policy's rules can neither see nor break
//! another's, and its name (the file stem) is what `--override` names.
//! Architecture invariant: evaluation is deterministic: policies are evaluated
//! in path order and findings are sorted, so the same specs and policies give
//! byte-identical reports.
//! Architecture invariant: verification fails closed: anything not positively
//! verified (unsigned, malformed, unknown key type, wrong namespace, key not
//! trusted) is a refusal with a reason.

#![warn(missing_docs)]

pub mod authorize;
pub mod commit;
pub mod eval;
pub mod report;
pub mod set;
pub mod sshsig;
pub mod testing;

pub use eval::{Enforcement, Finding, Override, Report, RuleKind};
pub use set::{Policy, PolicySet};

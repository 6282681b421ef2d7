//! `image`: built-in guests or a kernel (and initrd) in the spec repository.

use std::collections::BTreeMap;

use super::{Checker, unique};
use crate::diag::{Diagnostic, suggestion};
use crate::model::*;
use crate::spec::SpecSet;

/// The built-in guest images the runtime ships.
pub const BUILTIN_IMAGES: &[&str] = &[vm_config::BUILTIN_GUEST];

impl Checker<'_> {
    pub(super) fn images(&mut self, set: &SpecSet) -> BTreeMap<String, Image> {
        unique(self.diags, "image", "", set.images.iter().map(|i| &i.name));
        let mut out = BTreeMap::new();
        for i in &set.images {
            if out.contains_key(&i.name.value) {
                continue;
            }
            self.spans.insert("image", &i.name.value, i.name.span);
            if let Some(b) = &i.builtin {
                if !BUILTIN_IMAGES.contains(&b.value.as_str()) {
                    self.push(
                        Diagnostic::error(
                            "cairn::resolve::unknown_builtin_image",
                            b.span,
                            format!("`{}` is not a built-in image", b.value),
                        )
                        .with_help(suggestion(
                            &b.value,
                            BUILTIN_IMAGES,
                            "built-in image",
                        )),
                    );
                }
                if let Some(k) = &i.kernel {
                    self.push(
                        Diagnostic::error("cairn::check::image_builtin_and_kernel", k.span, format!("image `{}` is built in and also names a kernel", i.name.value))
                            .and_label(b.span, "built in")
                            .with_help("an image is either `builtin=\"cairn-guest\"` or a kernel with an optional initrd and cmdline"),
                    );
                }
            } else if i.kernel.is_none() {
                self.push(
                    Diagnostic::error("cairn::check::image_without_kernel", i.name.span, format!("image `{}` has neither a kernel nor `builtin`", i.name.value))
                        .with_help("add `kernel \"images/NAME/vmlinuz\"` inside the image, or write `image \"NAME\" builtin=\"cairn-guest\"`"),
                );
            }
            let disk = self.image_disk(i);
            for path in [&i.kernel, &i.initrd].into_iter().flatten() {
                if !self.sources.has_other_file(&path.value) {
                    self.push(
                        Diagnostic::warning("cairn::check::image_file_missing", path.span, format!("image file `{}` is not in the spec repository", path.value))
                            .with_help("paths are relative to the spec root; the file may be staged on the nodes later, but `apply` needs it"),
                    );
                }
            }
            out.insert(
                i.name.value.clone(),
                Image {
                    name: i.name.value.clone(),
                    builtin: i.builtin.as_ref().map(|b| b.value.clone()),
                    kernel: i.kernel.as_ref().map(|v| v.value.clone()),
                    initrd: i.initrd.as_ref().map(|v| v.value.clone()),
                    cmdline: i.cmdline.as_ref().map(|v| v.value.clone()),
                    disk,
                },
            );
        }
        out
    }

    /// An image's `disk "PATH" format=…`: the format must be one `qemu-img` is told;
    /// a file that is not in the spec repository is a warning, like a missing kernel
    /// (SPEC.md: image files may come later; `apply` imports it and needs it).
    fn image_disk(&mut self, i: &crate::spec::ImageSpec) -> Option<ImageDisk> {
        let d = i.disk.as_ref()?;
        let format = match &d.format {
            None => {
                self.push(
                    Diagnostic::error(
                        "cairn::check::image_disk_format",
                        d.path.span,
                        format!("the disk file of image `{}` has no `format`", i.name.value),
                    )
                    .with_help(
                        "say how the file is stored: `format=\"raw\"` or `format=\"qcow2\"`",
                    ),
                );
                None
            }
            Some(f) => {
                let parsed = ImageDiskFormat::parse(&f.value);
                if parsed.is_none() {
                    self.push(
                        Diagnostic::error(
                            "cairn::check::image_disk_format",
                            f.span,
                            format!("`{}` is not a disk file format", f.value),
                        )
                        .with_help(suggestion(
                            &f.value,
                            &ImageDiskFormat::ALL,
                            "format",
                        )),
                    );
                }
                parsed
            }
        };
        if !self.sources.has_other_file(&d.path.value) {
            self.push(
                Diagnostic::warning("cairn::check::image_disk_missing", d.path.span, format!("image `{}` names the disk file `{}`, which is not in the spec repository", i.name.value, d.path.value))
                    .with_help("paths are relative to the spec root; it may be added later, but `apply` imports it from the repository (with qemu-img) and needs it"),
            );
        }
        format.map(|format| ImageDisk {
            path: d.path.value.clone(),
            format,
            at: crate::diag::location(self.sources, d.path.span),
        })
    }
}

//! Image references as containerd and the CRI name images: `name:tag` becomes
//! `docker.io/library/name:tag`, the way Docker's reference parser fills in the defaults.

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {reference:?} is not valid: {why}")]
pub struct BadReference {
    pub reference: String,
    pub why: String,
}

/// Normalizes `reference` to its full form: a registry (default `docker.io`), a repository
/// path (`library/` added for one-component names on Docker Hub), and a tag (default `latest`
/// when there is neither tag nor digest). `index.docker.io` becomes `docker.io`.
pub fn normalize(reference: &str) -> Result<String, BadReference> {
    let bad = |why: &str| BadReference {
        reference: reference.to_string(),
        why: why.to_string(),
    };
    if reference.is_empty() || reference.trim() != reference {
        return Err(bad("empty or surrounded by spaces"));
    }
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => {
            parse_digest(d).map_err(|w| bad(&w))?;
            (n, Some(d))
        }
        None => (reference, None),
    };
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest.to_string())
        }
        Some(_) => ("docker.io", name.to_string()),
        None => ("docker.io", format!("library/{name}")),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if domain.is_empty()
        || !domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    {
        return Err(bad(
            "the registry name has characters a host name cannot have",
        ));
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(bad("a path component is empty"));
        }
        if component.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad("repository names must be lowercase"));
        }
        let ok_chars = component
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        let ends_ok = component
            .chars()
            .next()
            .zip(component.chars().last())
            .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
        if !ok_chars || !ends_ok {
            return Err(bad(&format!(
                "path component {component:?} must be lowercase letters and digits, \
                 separated by '.', '_' or '-'"
            )));
        }
    }
    let mut out = format!("{domain}/{path}");
    match tag {
        Some(t) => {
            let valid = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid {
                return Err(bad(&format!("tag {t:?} is not a valid tag")));
            }
            out.push(':');
            out.push_str(t);
        }
        None if digest.is_none() => out.push_str(":latest"),
        None => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

/// Checks a `sha256:<64 lowercase hex>` digest; the error says what is wrong.
pub fn parse_digest(digest: &str) -> Result<&str, String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err(format!("digest {digest:?} is not a sha256 digest"));
    };
    if hex.len() != 64
        || !hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(format!(
            "digest {digest:?} does not have 64 lowercase hex digits"
        ));
    }
    Ok(hex)
}

/// Whether `reference` names a registry on the loopback interface, which is spoken to over
/// plain HTTP — Docker's own default for 127.0.0.0/8 and `localhost`. Every other registry is
/// HTTPS only.
pub fn loopback_registry(reference: &str) -> bool {
    let Some((host, _)) = reference.split_once('/') else {
        return false;
    };
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_plain_http() {
        assert!(loopback_registry(
            "127.0.0.1:5000/rancher/mirrored-pause:3.6"
        ));
        assert!(loopback_registry("localhost:5000/pause:3.6"));
        assert!(loopback_registry("127.8.0.1/pause:3.6"));
        assert!(!loopback_registry("rancher/mirrored-pause:3.6"));
        assert!(!loopback_registry("registry.example:5000/pause:3.6"));
        assert!(!loopback_registry("10.0.0.1:5000/pause:3.6"));
        assert!(!loopback_registry("pause:3.6"));
    }

    #[test]
    fn short_names_get_docker_hub_and_library_and_latest() {
        assert_eq!(
            normalize("unidesk-code-queue:dev").unwrap(),
            "docker.io/library/unidesk-code-queue:dev"
        );
        assert_eq!(
            normalize("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize("rancher/mirrored-pause:3.6").unwrap(),
            "docker.io/rancher/mirrored-pause:3.6"
        );
        assert_eq!(
            normalize("index.docker.io/library/x:1").unwrap(),
            "docker.io/library/x:1"
        );
    }

    #[test]
    fn registries_with_ports_and_digests_are_kept() {
        assert_eq!(
            normalize("127.0.0.1:5000/pause:ok").unwrap(),
            "127.0.0.1:5000/pause:ok"
        );
        assert_eq!(normalize("localhost/a/b").unwrap(), "localhost/a/b:latest");
        assert_eq!(
            normalize("docker.io/library/already:tag").unwrap(),
            "docker.io/library/already:tag"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalize(&format!("x@{d}")).unwrap(),
            format!("docker.io/library/x@{d}")
        );
        assert_eq!(
            normalize(&format!("reg.io:443/x:1@{d}")).unwrap(),
            format!("reg.io:443/x:1@{d}")
        );
    }

    #[test]
    fn bad_references_are_refused_with_the_reason() {
        assert!(normalize("").is_err());
        assert!(
            normalize("Upper/case")
                .unwrap_err()
                .why
                .contains("lowercase")
        );
        assert!(normalize("x:").is_err());
        assert!(normalize("x:-bad").is_err());
        assert!(normalize("a//b").is_err());
        assert!(normalize("x@sha256:zz").is_err());
        assert!(normalize(" x").is_err());
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(parse_digest(&d).unwrap(), "0".repeat(64));
        assert!(parse_digest("sha512:00").is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
    }
}

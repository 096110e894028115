//! Making the cluster CA and issuing certificates with it (`ftctl certs`).
//!
//! The CA's distinguished name is fixed ([`CA_COMMON_NAME`]), so that the issuer can be
//! rebuilt from the CA's key alone: a certificate's issuer name and authority key
//! identifier then match the CA certificate without parsing it.

use crate::{Identity, Role, TlsError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::time::{Duration, SystemTime};

/// The common name of every cluster CA.
pub const CA_COMMON_NAME: &str = "ftvm cluster CA";

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

fn failed(err: rcgen::Error) -> TlsError {
    TlsError::Issue(err.to_string())
}

fn validity(params: &mut CertificateParams, days: u32) {
    // An hour back, for hosts whose clocks are a little behind the issuer's.
    let now = SystemTime::now();
    params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(3600));
    params.not_after =
        time::OffsetDateTime::from(now + Duration::from_secs(u64::from(days) * 86_400));
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The issuer of the cluster CA whose key is `ca_key_pem`.
fn ca_issuer(ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)
        .map_err(|err| TlsError::Issue(format!("the CA key is unusable: {err}")))?;
    Ok(Issuer::new(ca_params(), ca_key))
}

/// A certificate of `params`, valid for `days`, with a new key, signed by `issuer`.
fn sign(
    mut params: CertificateParams,
    issuer: &Issuer<'static, KeyPair>,
    days: u32,
) -> Result<Issued, TlsError> {
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(failed)?;
    let cert = params.signed_by(&key, issuer).map_err(failed)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new cluster CA valid for `days`.
pub fn new_ca(days: u32) -> Result<Issued, TlsError> {
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = ca_params();
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(failed)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for `identity`, valid for `days`, signed by the CA whose key is
/// `ca_key_pem`. Host certificates serve and connect (they also carry [`crate::SERVER_NAME`]);
/// operators and viewers only connect.
pub fn issue(ca_key_pem: &str, identity: &Identity, days: u32) -> Result<Issued, TlsError> {
    if !Identity::valid_name(&identity.name) {
        return Err(TlsError::Issue(format!(
            "{:?} is not a valid name (lowercase letters, digits and '-', at most 63)",
            identity.name
        )));
    }
    let issuer = ca_issuer(ca_key_pem)?;
    let mut names = vec![identity.dns_name()];
    if identity.role == Role::Host {
        names.push(crate::SERVER_NAME.to_owned());
    }
    let mut params = CertificateParams::new(names).map_err(failed)?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, identity.dns_name());
    params.distinguished_name = subject;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if identity.role == Role::Host {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    sign(params, &issuer, days)
}

/// A certificate for another server of the cluster (an etcd member), valid for `days`:
/// `names` are its DNS names and IP addresses. It serves and connects (etcd members do
/// both) but carries no ftvm role: it opens no ftd or replica port.
pub fn issue_server(
    ca_key_pem: &str,
    common_name: &str,
    names: &[String],
    days: u32,
) -> Result<Issued, TlsError> {
    if names.is_empty() {
        return Err(TlsError::Issue(
            "a server certificate needs at least one name or address".into(),
        ));
    }
    let issuer = ca_issuer(ca_key_pem)?;
    let mut params = CertificateParams::default();
    for name in names {
        if name.ends_with(".ftvm") {
            return Err(TlsError::Issue(format!(
                "{name}: names under .ftvm are for ftvm roles"
            )));
        }
        params
            .subject_alt_names
            .push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(failed)?),
            });
    }
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    params.distinguished_name = subject;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    sign(params, &issuer, days)
}

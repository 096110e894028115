//! Fuzz targets: functions that take arbitrary bytes, as a gRPC client could send them,
//! and check what must hold for every input. They panic only when a check fails; the
//! tests run them on generated inputs with a fixed budget and `cargo xtask fuzz` under a
//! coverage-guided engine for long runs.

use crate::grpc::convert;
use crate::keys::{self, VmKey};
use crate::model::{Assignment, HostName, Role, VmName, VmSpec};
use crate::supervisor::{run_args, ReplicaFiles};
use ftvm_contract::flags::RunArgs;
use ftvm_proto::v1::{CreateVmRequest, DeleteVmRequest, StopReplicaRequest};
use prost::Message;

/// `data` decoded as a gRPC request (its first byte says which) and converted as the
/// server would: refused with an error or accepted, never a panic. What is accepted
/// holds up downstream: a VM name makes keys that parse back to it; a created VM's
/// spec makes replica command lines that ftvmm reads back to the same flags.
pub fn grpc_request(data: &[u8]) {
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            let Ok(request) = CreateVmRequest::decode(body) else {
                return;
            };
            let Ok(request) = convert::vm_request(request.spec) else {
                return;
            };
            if let Ok(spec) = VmSpec::validate(&request) {
                accepted_spec(&spec);
            }
        }
        1 => {
            let Ok(request) = DeleteVmRequest::decode(body) else {
                return;
            };
            if let Ok(vm) = VmName::new(&request.name) {
                accepted_name(&vm);
            }
        }
        _ => {
            let Ok(request) = StopReplicaRequest::decode(body) else {
                return;
            };
            if let (Ok(vm), Ok(role)) = (VmName::new(&request.vm), convert::role(request.role)) {
                let key = keys::assignment(&vm, role);
                assert_eq!(VmKey::parse(&key), Some(VmKey::Assignment(vm, role)));
            }
        }
    }
}

/// An accepted VM name: every key made of it parses back to it.
fn accepted_name(vm: &VmName) {
    assert!(ftvm_contract::claims::valid_vm_name(vm.as_str()), "{vm}");
    assert_eq!(VmKey::parse(&keys::spec(vm)), Some(VmKey::Spec(vm.clone())));
    assert_eq!(
        VmKey::parse(&keys::status(vm)),
        Some(VmKey::Status(vm.clone()))
    );
    let claim = keys::go_live_claim(vm, "0123456789abcdef", 3);
    assert!(
        matches!(VmKey::parse(&claim), Some(VmKey::Claim { vm: ref named, generation: 3, .. }) if named == vm),
        "{claim}"
    );
}

/// An accepted spec: its replicas' command lines read back to the flags ftd built.
fn accepted_spec(spec: &VmSpec) {
    accepted_name(&spec.name);
    for (role, log_address, clone_from) in [
        (Role::Primary, Some("10.0.0.5:7800"), None),
        (Role::Backup, Some("10.0.0.5:7800"), None),
        (Role::Backup, None, Some("10.0.0.5:7801")),
    ] {
        let assignment = Assignment {
            host: HostName::new("host-a").expect("a host name"),
            generation: 2,
            uid: "0123456789abcdef".into(),
            replica: 1,
            log_address: log_address.map(str::to_owned),
            clone_listen: Some("10.0.0.6:7801".into()),
            clone_from: clone_from.map(str::to_owned),
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        let files = ReplicaFiles {
            console: "/var/lib/ftd/vm/console.log".into(),
            control: "/run/ftd/vm/control.sock".into(),
            disk: spec
                .private_disk_size()
                .map(|_| "/var/lib/ftd/disks/vm-0123456789abcdef-r1.img".into()),
        };
        let flags = run_args(
            files,
            "etcd://10.0.0.1:2379",
            &spec.name,
            role,
            &assignment,
            spec,
        );
        let args = flags.to_args();
        match RunArgs::parse_args(&args) {
            Ok(parsed) => assert_eq!(parsed, flags, "{args:?}"),
            Err(err) => panic!("ftvmm refuses what ftd built: {err}: {args:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use ftvm_proto::v1::{CreateVmRequest, NetSpec, VmSpec};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use prost::Message;

    /// Create requests whose fields are near what a client sends, encoded: most get
    /// past decoding, many past validation.
    fn create_requests() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof!["[a-z][a-z0-9-]{0,20}", "[ -~]{0,70}"];
        let path = prop_oneof!["/[a-z/._-]{1,40}", "[ -~]{0,40}"];
        let mem = prop_oneof![Just(64u64 << 20), any::<u64>()];
        let hosts = vec(prop_oneof!["[a-z][a-z0-9.-]{0,12}", "[ -~]{0,20}"], 0..4);
        let net = proptest::option::of((
            "[a-z0-9]{1,16}",
            prop_oneof![
                "52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}",
                "[ -~]{0,20}"
            ],
            prop_oneof!["10\\.0\\.[0-9]{1,3}\\.[0-9]{1,3}/[0-9]{1,2}", "[ -~]{0,20}"],
        ));
        // Shared, private, unspecified and values this version does not know; sizes
        // near a valid one and anything.
        let disk_mode = prop_oneof![Just(0i32), Just(1), Just(2), any::<i32>()];
        let disk_size = prop_oneof![Just(0u64), Just(64u64 << 20), any::<u64>()];
        let disk = (path.clone(), disk_mode, disk_size, path.clone());
        (name, path, mem, "[ -~]{0,60}", disk, net, hosts).prop_map(
            |(
                name,
                image,
                mem_bytes,
                cmdline,
                (disk, disk_mode, disk_size_bytes, disk_image),
                net,
                hosts,
            )| {
                let spec = VmSpec {
                    name,
                    image,
                    mem_bytes,
                    cmdline,
                    disk,
                    net: net.map(|(tap, mac, ip)| NetSpec { tap, mac, ip }),
                    hosts,
                    image_sha256: String::new(),
                    disk_mode,
                    disk_size_bytes,
                    disk_image,
                };
                let mut bytes = vec![0u8];
                CreateVmRequest { spec: Some(spec) }
                    .encode(&mut bytes)
                    .expect("encode");
                bytes
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn grpc_request(data in prop_oneof![vec(any::<u8>(), 0..512), create_requests()]) {
            super::grpc_request(&data);
        }
    }
}

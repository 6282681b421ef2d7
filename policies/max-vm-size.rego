# METADATA
# title: Maximum VM size per tenant
# description: No VM is bigger than its tenant's limit in data.cairn_limits (policies/data/limits.json); tenants without an entry get the default.
# custom:
#   enforcement: hard-mandatory
package cairn.size

import rego.v1

gib := 1073741824

# Tenant name -> its limits, computed once per tenant and looked up per VM.
limits := {t: object.get(data.cairn_limits.max_vm.tenants, t, data.cairn_limits.max_vm.default) | some t in {vm.tenant | some vm in input.vms}}

deny contains "policy data cairn_limits is missing: add policies/data/limits.json" if {
	not data.cairn_limits.max_vm.default
}

deny contains msg if {
	some vm in input.vms
	l := limits[vm.tenant]
	vm.cpu > l.cpu
	msg := sprintf("vm %s: %d vCPUs is over tenant %s's maximum VM size of %d vCPUs", [vm.name, vm.cpu, vm.tenant, l.cpu])
}

deny contains msg if {
	some vm in input.vms
	l := limits[vm.tenant]
	vm.memory_bytes > l.memory_gib * gib
	msg := sprintf("vm %s: %v GiB of memory is over tenant %s's maximum VM size of %v GiB", [vm.name, vm.memory_bytes / gib, vm.tenant, l.memory_gib])
}

deny contains msg if {
	some vm in input.vms
	l := limits[vm.tenant]
	disk := sum([d.size_bytes | some d in vm.disks])
	disk > l.disk_gib * gib
	msg := sprintf("vm %s: %v GiB of disks is over tenant %s's maximum of %v GiB per VM", [vm.name, disk / gib, vm.tenant, l.disk_gib])
}

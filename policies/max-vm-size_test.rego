package cairn.size

import rego.v1

fixture_limits := {"max_vm": {"default": {"cpu": 8, "memory_gib": 32, "disk_gib": 100}, "tenants": {"small": {"cpu": 2, "memory_gib": 4, "disk_gib": 10}}}}

mk_vm(name, tenant, cpu, mem_gib, disk_gib) := {"name": name, "tenant": tenant, "cpu": cpu, "memory_bytes": mem_gib * 1073741824, "disks": [{"size_bytes": disk_gib * 1073741824}]}

test_within_default_passes if {
	count(deny) == 0 with input as {"vms": [mk_vm("a", "big", 8, 32, 100)]} with data.cairn_limits as fixture_limits
}

test_tenant_limit_applies if {
	deny == {
		"vm a: 4 vCPUs is over tenant small's maximum VM size of 2 vCPUs",
		"vm a: 8 GiB of memory is over tenant small's maximum VM size of 4 GiB",
		"vm a: 20 GiB of disks is over tenant small's maximum of 10 GiB per VM",
	} with input as {"vms": [mk_vm("a", "small", 4, 8, 20)]} with data.cairn_limits as fixture_limits
}

test_missing_data_fails_closed if {
	deny == {"policy data cairn_limits is missing: add policies/data/limits.json"} with input as {"vms": []} with data.cairn_limits as {}
}

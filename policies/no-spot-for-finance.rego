package cairn

import rego.v1

deny contains msg if {
    some vm in input.vms
    vm.tenant == "finance"
    vm.sla.class == "spot"
    msg := sprintf("vm %s: finance workloads may not run on spot capacity", [vm.name])
}

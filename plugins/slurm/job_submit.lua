--[[
kasched's job_submit/lua for Slurm 22.05 (JobSubmitPlugins=lua; slurmctld reads job_submit.lua from
the directory of slurm.conf). For a job that asks for the "deploy" feature (salloc/sbatch -C deploy):
  * no requeue: a deploy job's nodes may have been reinstalled; when its PrologSlurmctld fails or
    one of its nodes fails, the job ends (and its grant is revoked) instead of starting again later
    under the same job id on other nodes;
  * whole nodes only: a user who reinstalls a node must be its only user.
Other jobs are left as they are.
--]]

local function wants_deploy(features)
    if features == nil then
        return false
    end
    for word in string.gmatch(features, "[^&|,%[%]%*%(%)%s]+") do
        if word == "deploy" then
            return true
        end
    end
    return false
end

function slurm_job_submit(job_desc, part_list, submit_uid)
    if wants_deploy(job_desc.features) then
        job_desc.requeue = 0
        job_desc.shared = 0
        slurm.log_info("kasched: deploy job of uid %u: no requeue, whole nodes", submit_uid)
    end
    return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    if wants_deploy(job_desc.features) then
        job_desc.requeue = 0
        job_desc.shared = 0
    end
    return slurm.SUCCESS
end

return slurm.SUCCESS

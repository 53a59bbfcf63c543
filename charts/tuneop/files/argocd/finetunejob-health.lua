-- Argo CD health of a tuneop.dev FineTuneJob (resource.customizations.health.tuneop.dev_FineTuneJob).
-- Succeeded -> Healthy; Failed -> Degraded; Suspended -> Suspended; Pending, Validating, Running
-- and Evaluating -> Progressing (a training job that is running is never Degraded); a status older than
-- the spec (observedGeneration < generation) -> Progressing.
local hs = {}
local function condition(status, ctype)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then return c end
  end
  return nil
end
local function describe(status, fallback)
  local text = ""
  if status.reason ~= nil then text = status.reason end
  if status.message ~= nil and status.message ~= "" then
    if text ~= "" then text = text .. ": " end
    text = text .. status.message
  end
  if text == "" then text = fallback end
  return text
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the tuneop operator"
  return hs
end
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local failed = condition(status, "Failed")
local succeeded = condition(status, "Succeeded")
local phase = status.phase
if phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  hs.message = describe(status, "Failed")
elseif phase == "Succeeded" or (succeeded ~= nil and succeeded.status == "True") then
  hs.status = "Healthy"
  hs.message = describe(status, "Succeeded")
  if status.adapter ~= nil and status.adapter.location ~= nil then
    hs.message = hs.message .. " (adapter " .. status.adapter.location .. ")"
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(status, "Suspended")
else
  -- Pending, Validating, Running, Evaluating and any phase this script does not know yet.
  hs.status = "Progressing"
  hs.message = describe(status, phase)
  local p = status.progress
  if phase == "Running" and p ~= nil and p.step ~= nil and p.totalSteps ~= nil then
    hs.message = hs.message .. " (step " .. tostring(p.step) .. "/" .. tostring(p.totalSteps) .. ")"
  end
end
return hs

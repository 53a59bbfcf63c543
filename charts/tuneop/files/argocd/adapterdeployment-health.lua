-- Argo CD health of a tuneop.dev AdapterDeployment
-- (resource.customizations.health.tuneop.dev_AdapterDeployment).
-- Ready (condition Ready=True) -> Healthy; Failed (invalid spec) or an adapter that failed to
-- load -> Degraded; scaled to 0 replicas -> Suspended; pods starting, adapters waiting for their
-- FineTuneJob or being loaded -> Progressing; a status older than the spec -> Progressing.
local hs = {}
local function condition(status, ctype)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then return c end
  end
  return nil
end

if obj.status == nil or (obj.status.phase == nil and obj.status.conditions == nil) then
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

local ready = condition(status, "Ready")
local adapters = condition(status, "AdaptersReady")
local available = condition(status, "Available")
local message = status.message or ""
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
elseif adapters ~= nil and adapters.status == "False" and adapters.reason == "AdapterLoadFailed" then
  hs.status = "Degraded"
  hs.message = adapters.message or message
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or message
elseif status.phase == "Ready" and ready == nil then
  hs.status = "Healthy"
  hs.message = message
elseif available ~= nil and available.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = available.message or "replicas is 0"
else
  hs.status = "Progressing"
  if ready ~= nil and ready.message ~= nil then message = ready.message end
  hs.message = message
end
return hs
